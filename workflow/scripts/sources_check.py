"""Rule sources_check -> flanpipe.data.sources.check_sources (the job fails on a blocking finding)."""

from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.core.registry import spec_from_facts
from flanpipe.data.sources import check_sources, format_table, write_report

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    ops = snakemake.params.ops  # operational: where to look (flanpipe.plan.contract)
    facts = snakemake.params.entries  # each entry's tracked ingest facts: what is checked
    registry = {d: spec_from_facts(f, defined_in=ops["defined_in"][d]) for d, f in facts.items()}
    checks = check_sources(registry, Path(ops["root"]), ops["hf_cache"])
    print(format_table(checks))
    if any(c.blocking for c in checks):
        raise SystemExit(f"sources_check: a blocking finding (see {snakemake.log[0]}); fix the registry entries first")
    write_report(checks, snakemake.output.table)  # and output.json beside it
