"""Rules ingest (local files) and download (HuggingFace hub) -> flanpipe.data.ingest.ingest_split."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json
from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.core.registry import spec_from_facts
from flanpipe.data.ingest import ingest_split

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    ops = snakemake.params.ops  # operational: where things are (flanpipe.plan.contract.ingest_spec)
    spec = spec_from_facts(snakemake.params.spec, defined_in=ops["defined_in"])  # the tracked facts, nothing else
    report = ingest_split(
        spec,
        snakemake.wildcards.split,
        snakemake.output[0],
        policy=spec.bad_rows,
        root=Path(ops["root"]),
        hf_cache=ops["hf_cache"],
        eval_splits={r: snakemake.input[r] for r in ("validation", "test") if r in snakemake.input.keys()},
        **snakemake.params.policy,  # the train role's split_duplicates (flanpipe.plan.contract.ingest_policy)
    )
    print(json.dumps(report))
