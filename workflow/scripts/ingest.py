"""Rules ingest (local files) and download (HuggingFace hub) -> flanpipe.data.ingest.ingest_split."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json
from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.data.ingest import ingest_split
from flanpipe.plan.config import dataset_spec

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    spec = dataset_spec(snakemake.config, snakemake.params.dataset)
    report = ingest_split(
        spec,
        snakemake.wildcards.split,
        snakemake.output[0],
        policy=snakemake.params.bad_rows,
        root=Path(snakemake.params.root),
        hf_cache=snakemake.params.hf_cache,
        eval_splits={r: snakemake.input[r] for r in ("validation", "test") if r in snakemake.input.keys()},
        split_duplicates=snakemake.params.split_duplicates,
    )
    print(json.dumps(report))
