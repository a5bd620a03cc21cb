# Input functions of rules/audit.smk (kept beside it, not in common.smk, so the audit stays one unit).




def audit_inputs(wildcards):
    """The run's mixture, the canonical eval splits of every audited dataset, the template file of
    those prompted with instructions (Plan.template_audited_datasets) and the canonical train split of
    every dataset the run trains on (its ingest split-hygiene counts go into the report)."""
    inputs = {"mixture": f"results/mixtures/{wildcards.run}/mixture.parquet"}
    for d in PLAN.run_shards(wildcards.run):
        inputs[f"train__{d}"] = f"results/ingest/{d}/train.parquet"
    for d in PLAN.audited_datasets(wildcards.run):
        inputs[f"validation__{d}"] = f"results/ingest/{d}/validation.parquet"
        inputs[f"test__{d}"] = f"results/ingest/{d}/test.parquet"
    for d in PLAN.template_audited_datasets(wildcards.run):
        inputs[f"templates__{d}"] = ancient(str(PLAN.registry[d].templates))  # tracked parsed: audit_template_facts
    return inputs


def audit_template_facts(wildcards):
    """dataset -> its parsed templates, for every template file the audit reads (contract.template_facts)."""
    return {d: contract.template_facts(templates_of(d)) for d in PLAN.template_audited_datasets(wildcards.run)}


def audit_report(wildcards):
    """Training's gate: the audit must have passed (a failed one writes no output), but a re-audit whose verdict
    stays a pass must not retrain, so training ignores the file's time (ancient)."""
    return ancient(f"results/audit/{wildcards.run}.json")


def uncertainty_inputs(wildcards=None):
    """Every main-result evaluation (as rule report) and the audit of each run among them trained here."""
    runs = sorted({e.run for e in PLAN.evaluations} & set(PLAN.mixtures))
    return {"results": report_inputs(), **{f"audit__{r}": f"results/audit/{r}.json" for r in runs}}
