"""Rule report -> flanpipe.report.figures.write_summary over the plan's main evaluations and the runs' audits."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from flanpipe.core.io import log_to, read_json
from flanpipe.report.figures import write_summary
from flanpipe.report.tables import load_records

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    records = load_records(list(snakemake.input.results), snakemake.params.meta)
    audits = {k.partition("__")[2]: read_json(v) for k, v in snakemake.input.items() if k.startswith("audit__")}
    write_summary(
        records,
        snakemake.output.json,
        snakemake.output.md,
        snakemake.output.figure,
        experiment=snakemake.params.experiment,
        audits=audits,
        published=snakemake.params.published,
        seed=snakemake.params.seed,
    )
