# Megatron-Core training of one model per mixture, launched with torchrun (srun under SLURM: profiles/).


rule train_spec:
    input:
        model_config=str(MODEL_CONFIG),
    output:
        "results/specs/{mixture}.json",
    params:
        spec=TRAIN_SPEC,
    log:
        "logs/train_spec/{mixture}.log",
    benchmark:
        "benchmarks/train_spec/{mixture}.tsv"
    script:
        "../workflow/scripts/train_spec.py"


rule train:
    input:
        spec="results/specs/{mixture}.json",
        data="results/packed/{mixture}",
    output:
        directory("results/models/{mixture}"),
    log:
        "logs/train/{mixture}.log",
    benchmark:
        "benchmarks/train/{mixture}.tsv"
    resources:
        tasks=train_tasks,
    shell:
        "torchrun --standalone --nnodes 1 --nproc_per_node {resources.tasks} "
        "-m flanpipe.train --spec {input.spec} --data {input.data} --out {output} > {log} 2>&1"
