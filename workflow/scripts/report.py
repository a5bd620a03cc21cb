"""Rule report -> flanpipe.figures.write_summary over the plan's main evaluations."""

from flanpipe.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from flanpipe.figures import write_summary
from flanpipe.io import log_to
from flanpipe.report import load_records

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    records = load_records(list(snakemake.input), snakemake.params.meta)
    write_summary(
        records,
        snakemake.output.json,
        snakemake.output.md,
        snakemake.output.figure,
        experiment=snakemake.params.experiment,
    )
