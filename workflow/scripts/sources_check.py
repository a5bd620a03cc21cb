"""Rule sources_check -> flanpipe.data.sources.check_sources (exit status 1 on a blocking finding)."""

from pathlib import Path

from flanpipe.core.io import log_to, write_json
from flanpipe.data.sources import as_json, check_sources, format_table
from flanpipe.plan.config import dataset_spec

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    registry = {d: dataset_spec(snakemake.config, d) for d in snakemake.params.entries}
    checks = check_sources(registry, Path(snakemake.params.root), snakemake.params.hf_cache)
    table = format_table(checks)
    print(table)
    if any(c.blocking for c in checks):
        raise SystemExit(f"sources_check: a blocking finding (see {snakemake.log[0]}); fix the registry entries first")
    write_json(snakemake.output.json, as_json(checks))
    Path(snakemake.output.table).write_text(table, encoding="utf-8")
