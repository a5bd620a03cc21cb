"""Rule report -> flanpipe.report.write_report."""

from flanpipe.io import log_to
from flanpipe.report import write_report

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    write_report(list(snakemake.input), snakemake.output.json, snakemake.output.md)
