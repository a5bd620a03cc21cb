# Intervals, clean-subset scores (contaminated eval examples left out) and tuned-vs-base tests for the
# main results (flanpipe.report.uncertainty): `snakemake results/uncertainty.md`.


rule uncertainty:
    input:
        unpack(uncertainty_inputs),
    output:
        json="results/uncertainty.json",
        md="results/uncertainty.md",
    params:
        meta=report_meta(),
        n_boot=2000,
        seed=config["mixture"]["seed"],
        version=stage_version("uncertainty"),
    threads: 1
    log:
        "logs/uncertainty/uncertainty.log",
    benchmark:
        "benchmarks/uncertainty/uncertainty.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/uncertainty.py"
