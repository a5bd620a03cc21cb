# One mixture per run: capped, examples-proportional, sized to the run's training budget.


rule mix:
    input:
        unpack(run_shards),
    output:
        parquet="results/mixtures/{run}/mixture.parquet",
        stats="results/mixtures/{run}/mixture.json",
    params:
        mixture=contract.block(config, "mixture"),
        budget_tokens=run_budget,
        lengths=contract.lengths(config),
        version=stage_version("mix"),
    threads: 2
    log:
        "logs/mix/{run}.log",
    benchmark:
        "benchmarks/mix/{run}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/mix.py"
