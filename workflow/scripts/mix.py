"""Rule mix -> flanpipe.data.mixing.build_mixture."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json

from flanpipe.core.io import log_to
from flanpipe.data.mixing import MixtureConfig, bucket_bytes_for, build_mixture

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    stats = build_mixture(
        dict(snakemake.input.items()),
        MixtureConfig(**snakemake.params.mixture),
        snakemake.output.parquet,
        snakemake.output.stats,
        budget_tokens=snakemake.params.budget_tokens,
        inputs_length=snakemake.params.lengths["inputs"],
        targets_length=snakemake.params.lengths["targets"],
        bucket_bytes=bucket_bytes_for(getattr(snakemake.resources, "mem_mb", None)),
    )
    print(json.dumps(stats, indent=2))
