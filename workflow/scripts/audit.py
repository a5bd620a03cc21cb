"""Rule audit -> flanpipe.data.contamination.run_audit."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json

from flanpipe.core.io import log_to
from flanpipe.data.contamination import AuditConfig, run_audit

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    splits: dict[str, dict[str, str]] = {}
    template_files: dict[str, str] = {}
    train: dict[str, str] = {}
    for key, path in snakemake.input.items():  # "<validation|test|train|templates>__<dataset>" (rules/audit.smk)
        what, _, dataset = key.partition("__")
        if not dataset:
            continue
        if what == "templates":
            template_files[dataset] = path
        elif what == "train":
            train[dataset] = path
        else:
            splits.setdefault(dataset, {})[what] = path
    report = run_audit(
        snakemake.input.mixture,
        splits,
        template_files,
        snakemake.output[0],
        AuditConfig(**snakemake.params.audit),
        max_examples=snakemake.params.max_examples,
        train_splits=train,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "datasets"}, indent=2))
