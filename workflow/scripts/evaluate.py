"""Rule evaluate -> flanpipe.evaluate.run_evaluation."""

from flanpipe.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json
from pathlib import Path

from flanpipe.evaluate import run_evaluation
from flanpipe.io import log_to

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    result = run_evaluation(
        Path(snakemake.input.model),
        Path(snakemake.input.tokenizer),
        Path(snakemake.input.shard),
        Path(snakemake.output[0]),
        metric=snakemake.params.metric,
        lengths=snakemake.params.lengths,
        batch_size=snakemake.params.batch_size,
    )
    print(json.dumps(result, indent=2))
