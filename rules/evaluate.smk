# Zero-shot (and few-shot) evaluation: one model ({evalrun}: a tuned run or the base model) on one
# dataset under one prompt variant, every template.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        "results/eval/{evalrun}/{variant}/{dataset}.json",
    params:
        metric=dataset_metric,
        lengths=config["lengths"],
        batch_size=config["eval"]["batch_size"],
    threads: 1
    log:
        "logs/evaluate/{evalrun}/{variant}/{dataset}.log",
    benchmark:
        "benchmarks/evaluate/{evalrun}/{variant}/{dataset}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/evaluate.py"
