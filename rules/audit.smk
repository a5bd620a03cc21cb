# Contamination audit, one per trained run, before its training is trusted: n-gram overlap of the run's
# mixture with the eval examples and templates of every dataset that run's model is scored on
# (flanpipe.data.contamination). A failed audit writes no output, so training cannot start; training takes the
# audit as an `ancient` input: it waits for the verdict, not the file's time, so a re-audit that still passes
# (a threshold edited) retrains nothing. Template files are tracked by their parsed templates, as in rendering.


include: "audit_common.smk"


rule audit:
    input:
        unpack(audit_inputs),
    output:
        "results/audit/{run}.json",
    params:
        audit=contract.block(config, "audit"),
        max_examples=config["eval"]["examples"],
        parsed_templates=audit_template_facts,
        version=stage_version("audit"),
    threads: 2
    # A run's audit gates its training (rule train takes it as input): what a training run waits on goes ahead
    # of everything else, training included (priority 10), as rule pack does.
    priority: 20
    log:
        "logs/audit/{run}.log",
    benchmark:
        "benchmarks/audit/{run}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/audit.py"
