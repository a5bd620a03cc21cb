"""Rule ablation -> flanpipe.report.figures.write_ablation."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from flanpipe.core.io import log_to
from flanpipe.report.figures import write_ablation
from flanpipe.report.tables import load_records

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    records = load_records(list(snakemake.input), snakemake.params.meta)
    table = write_ablation(
        snakemake.wildcards.ablation,
        records,
        snakemake.output.json,
        snakemake.output.figure,
        experiment=snakemake.params.experiment,
    )
    print(table)
