"""Rule generate_synthetic -> flanpipe.data.synthetic.generate_dataset."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.data.synthetic import generate_dataset

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    paths = generate_dataset(
        snakemake.wildcards.synthetic,
        Path(snakemake.output[0]).parent,
        sizes=dict(snakemake.params.sizes),
        seed=snakemake.params.seed,
    )
    print("wrote", *paths)
