"""Rule sources_check -> flanpipe.data.sources.check_sources (the job fails on a blocking finding)."""

from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.data.sources import check_sources, format_table, write_report
from flanpipe.plan.config import dataset_spec

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    registry = {d: dataset_spec(snakemake.config, d) for d in snakemake.params.entries}
    checks = check_sources(registry, Path(snakemake.params.root), snakemake.params.hf_cache)
    print(format_table(checks))
    if any(c.blocking for c in checks):
        raise SystemExit(f"sources_check: a blocking finding (see {snakemake.log[0]}); fix the registry entries first")
    write_report(checks, snakemake.output.table)  # and output.json beside it
