"""Rule evaluate -> flanpipe.evaluate.evaluate_many (one model load, one result per dataset)."""

import json
from pathlib import Path

from flanpipe.evaluate import evaluate_many
from flanpipe.io import log_to

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    group = snakemake.params.group
    results = evaluate_many(
        Path(snakemake.input.model),
        Path(snakemake.input.tokenizer),
        dict(zip(group["datasets"], map(Path, snakemake.input.shards), strict=True)),
        dict(zip(group["datasets"], group["metrics"], strict=True)),
        Path(snakemake.output[0]),
        lengths=snakemake.params.lengths,
        batch_size=snakemake.params.batch_size,
    )
    print(json.dumps(results, indent=2))
