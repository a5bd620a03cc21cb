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
        inputs[f"templates__{d}"] = str(PLAN.registry[d].templates)
    return inputs


def audit_report(wildcards):
    return f"results/audit/{wildcards.run}.json"


def uncertainty_inputs(wildcards=None):
    """Every main-result evaluation (as rule report) and the audit of each run among them trained here."""
    runs = sorted({e.run for e in PLAN.evaluations} & set(PLAN.mixtures))
    return {"results": report_inputs(), **{f"audit__{r}": f"results/audit/{r}.json" for r in runs}}
