# One mixture per held-out cluster: capped, examples-proportional, sized to the training budget.


rule mix:
    input:
        unpack(mixture_shards),
    output:
        parquet="results/mixtures/{mixture}/mixture.parquet",
        stats="results/mixtures/{mixture}/mixture.json",
    params:
        mixture=config["mixture"],
        budget_tokens=budget_tokens(config),
        lengths=config["lengths"],
    log:
        "logs/mix/{mixture}.log",
    benchmark:
        "benchmarks/mix/{mixture}.tsv"
    script:
        "../workflow/scripts/mix.py"
