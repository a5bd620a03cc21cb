"""Rule render_eval_shard -> flanpipe.data.templates.render_eval_shard."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json

from flanpipe.core.io import log_to
from flanpipe.core.registry import spec_from_facts
from flanpipe.data.templates import render_eval_shard

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    # the tracked facts of the entry (flanpipe.core.registry.RENDER_FACTS), and the template file as input
    spec = spec_from_facts(snakemake.params.dataset, templates=snakemake.input.templates)
    variant = snakemake.params.variant
    report = render_eval_shard(
        spec,
        {"validation": snakemake.input.validation, "test": snakemake.input.test},
        snakemake.output[0],
        mode=variant["mode"],
        max_examples=snakemake.params.max_examples,
        options_in_prompt=variant["options_in_prompt"],
        shots=variant["shots"],
        train=snakemake.input.get("train"),
        seed=snakemake.params.seed,
    )
    print(json.dumps(report))
