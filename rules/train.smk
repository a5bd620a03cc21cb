# Megatron-Core training, one model per run: `flanpipe launch` runs torchrun, or srun under SLURM
# (profiles/). Tuned runs start from the base model's weights when there is one.


# The spec holds what changes the weights (model config and the train facts, canonical); the model config
# file only has to exist, its parsed content is in the spec param.
rule train_spec:
    input:
        model_config=ancient(run_model_config),
    output:
        "results/specs/{run}.json",
    params:
        spec=run_spec,
        version=stage_version("train_spec"),
    threads: 1
    log:
        "logs/train_spec/{run}.log",
    benchmark:
        "benchmarks/train_spec/{run}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/train_spec.py"


rule train:
    input:
        unpack(train_inputs),
        audit=audit_report,  # rules/audit.smk: a failed contamination audit stops the run here
    output:
        directory("results/models/{run}"),
    params:
        ops=contract.train_ops(config),  # operational (log/save cadence, micro-batch, TP/PP): never a rerun
        version=stage_version("train"),
    threads: train_threads  # the two held-out runs train side by side; split over ranks
    # Training is the DAG's critical path: every evaluation and the report wait on a run, so a free core goes
    # to a run before any evaluate job; its own inputs (pack, audit: priority 20) before it. Without these,
    # the default's second held-out run started 64-80 s after the first (2 cores).
    priority: 10
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    resources:
        tasks=train_tasks,
        mpi="",  # empty: torchrun; profiles/slurm sets "srun" (one SLURM task per rank)
    conda:
        CONDA_ENV
    shell:
        "flanpipe launch --mpi '{resources.mpi}' --nproc {resources.tasks} -- "
        "--spec {input.spec} --data {input.data} --out {output} --ops {params.ops:q} > {log} 2>&1"
