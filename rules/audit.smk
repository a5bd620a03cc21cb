# Contamination audit, one per trained run, before its training is trusted: n-gram overlap of the run's
# mixture with the eval examples and templates of every dataset that run's model is scored on
# (flanpipe.data.contamination). Training depends on the audit's output, so a failed audit stops the run.


include: "audit_common.smk"


rule audit:
    input:
        unpack(audit_inputs),
    output:
        "results/audit/{run}.json",
    params:
        audit=config["audit"],
        max_examples=config["eval"]["examples"],
    threads: 2
    log:
        "logs/audit/{run}.log",
    benchmark:
        "benchmarks/audit/{run}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/audit.py"
