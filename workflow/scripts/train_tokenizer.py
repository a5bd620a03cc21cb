"""Rule train_tokenizer -> flanpipe.data.tokenize.train_tokenizer."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.data.tokenize import train_tokenizer

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    print(
        train_tokenizer(
            [Path(p) for p in snakemake.input],
            Path(snakemake.output[0]),
            vocab_size=snakemake.params.vocab_size,
            sample_size=snakemake.params.sample_size,
            seed=snakemake.params.seed,
            num_threads=snakemake.threads,
        )
    )
