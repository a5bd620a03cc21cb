# Zero-shot (and few-shot) evaluation. One `evaluate` job scores one model ({evalrun}: a tuned run or the
# base model) under one prompt variant on every planned dataset of one cluster, loading the model once
# (flanpipe.plan.eval_plan says why, and what a template edit reruns). It writes one result per dataset into
# its directory; `eval_result` puts each where the report reads it, results/eval/{evalrun}/{variant}/{dataset}.json.


rule evaluate:
    input:
        unpack(eval_group_inputs),
    output:
        directory("results/eval_groups/{evalrun}/{variant}/{cluster}"),
    params:
        group=eval_group_params,
        lengths=config["lengths"],
        batch_size=config["eval"]["batch_size"],
        rank={k: config["eval"][k] for k in ("scoring", "convention", "option_tokens", "bad_option_lists")},
    threads: 1
    log:
        "logs/evaluate/{evalrun}/{variant}/{cluster}.log",
    benchmark:
        "benchmarks/evaluate/{evalrun}/{variant}/{cluster}.tsv"
    resources:
        tasks=eval_tasks,  # TP x PP ranks (eval.layout, else train's); more from the profile are data parallel
        mpi="",  # empty: torchrun (or in-process for 1 task); profiles/slurm sets "srun"
    wildcard_constraints:
        cluster=r"[A-Za-z0-9_]+",
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/evaluate.py"


localrules:
    eval_result,


rule eval_result:
    input:
        eval_group_dir,
    output:
        "results/eval/{evalrun}/{variant}/{dataset}.json",
    conda:
        CONDA_ENV
    threads: 1
    log:
        "logs/eval_result/{evalrun}/{variant}/{dataset}.log",
    benchmark:
        "benchmarks/eval_result/{evalrun}/{variant}/{dataset}.tsv"
    shell:
        "cp {input}/{wildcards.dataset}.json {output} 2> {log}"
