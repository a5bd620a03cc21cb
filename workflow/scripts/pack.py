"""Rule pack -> flanpipe.data.packing.pack_mixture."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json
from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.data.packing import pack_mixture

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    stats = pack_mixture(
        Path(snakemake.input.mixture),
        Path(snakemake.input.tokenizer),
        Path(snakemake.input.model_config),
        Path(snakemake.output[0]),
        lengths=snakemake.params.lengths,
        seed=snakemake.params.seed,
        num_threads=snakemake.threads,
    )
    print(json.dumps(stats, indent=2))
