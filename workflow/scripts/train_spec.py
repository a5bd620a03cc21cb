"""Rule train_spec -> the JSON run spec flanpipe.train.loop reads (built by flanpipe.plan.config.train_spec)."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from flanpipe.core.io import log_to, write_json

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    write_json(snakemake.output[0], dict(snakemake.params.spec))
