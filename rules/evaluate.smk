# Zero-shot evaluation of each held-out cluster's model on every dataset of that cluster.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        "results/eval/{mixture}/{dataset}.json",
    params:
        metric=dataset_metric,
        lengths=config["lengths"],
        batch_size=config["eval"]["batch_size"],
    log:
        "logs/evaluate/{mixture}/{dataset}.log",
    benchmark:
        "benchmarks/evaluate/{mixture}/{dataset}.tsv"
    script:
        "../workflow/scripts/evaluate.py"
