"""Rule evaluate -> flanpipe.eval.evaluate.evaluate_many (one model load, one result per dataset): in this
process for one rank, else on `tasks` ranks started by flanpipe.train.launch (torchrun, or srun under SLURM)."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

import json
import sys
from pathlib import Path

from flanpipe.core.io import log_to
from flanpipe.eval.evaluate import RankConfig, eval_argv, evaluate_many
from flanpipe.train.launch import launch

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    group = snakemake.params.group
    tp, pp = group["layout"]
    args = (
        Path(snakemake.input.model),
        Path(snakemake.input.tokenizer),
        dict(zip(group["datasets"], map(Path, snakemake.input.shards), strict=True)),
        dict(zip(group["datasets"], group["metrics"], strict=True)),
        Path(snakemake.output[0]),
    )
    kw = {"lengths": snakemake.params.lengths, "batch_size": snakemake.params.batch_size, "tp": tp, "pp": pp}
    kw["rank"] = RankConfig(**snakemake.params.rank)
    tasks, mpi = int(snakemake.resources.tasks), str(snakemake.resources.mpi)
    if tasks == 1 and not mpi.strip():
        print(json.dumps(evaluate_many(*args, **kw), indent=2))
    elif status := launch(eval_argv(*args, **kw), tasks, mpi, module="flanpipe.eval.evaluate"):
        sys.exit(status)
