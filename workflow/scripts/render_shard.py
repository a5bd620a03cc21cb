"""Rule render_shard -> flanpipe.data.templates.render_shard."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json

from flanpipe.core.io import log_to
from flanpipe.core.registry import spec_from_facts
from flanpipe.data.formats import FormatMix
from flanpipe.data.templates import render_shard

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    # the tracked facts of the entry (flanpipe.core.registry.RENDER_FACTS), and the template file as input
    spec = spec_from_facts(snakemake.params.dataset, templates=snakemake.input.templates)
    report = render_shard(
        spec,
        snakemake.input.canonical,
        snakemake.output[0],
        mode=snakemake.params.mode,
        num_templates=snakemake.params.num_templates,
        formats=FormatMix.from_config(snakemake.params.formats),
    )
    print(json.dumps(report))
