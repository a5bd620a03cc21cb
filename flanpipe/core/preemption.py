"""Where a run's resumable checkpoints live and how a preempted run says so: the part of checkpointing
that ``flanpipe launch`` needs, without torch (the launcher only starts the ranks and waits for them; the
torch import it used to pay for these few file operations cost ~2 s of CPU per training job).

flanpipe.model.checkpointing writes the checkpoints themselves and re-exports these names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PREEMPTED_EXIT_CODE = 143
"""Exit status after a SIGTERM-triggered save (128 + SIGTERM, what a shell reports for a
process SIGTERM killed): a wrapper or SLURM epilog can requeue on it. Under srun each rank
exits with it; torchrun reports any non-zero worker status as its own failure (1), so
``flanpipe launch`` turns that into 143 when the preempted marker (below) says the ranks saved."""

PREEMPTED_MARKER = "preempted.json"
"""Written into the checkpoint dir by rank 0 when a SIGTERM'd run has saved; ``flanpipe launch`` removes
it before starting the ranks. It is how the launcher tells a clean preemption from a crash behind
torchrun, which reports any worker exit as its own failure (status 1)."""


def default_ckpt_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``results/models/run`` -> ``results/models/run.ckpt`` (outside the Snakemake output)."""
    out = Path(out_dir).absolute()
    return out.with_name(out.name + ".ckpt")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp sibling, fsync it, rename it onto ``path`` and fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory (its new entries survive a crash); a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_preempted(ckpt_dir: Path, step: int, path: Path) -> None:
    write_atomic(Path(ckpt_dir) / PREEMPTED_MARKER, json.dumps({"step": step, "checkpoint": str(path)}) + "\n")


def clear_preempted(ckpt_dir: Path) -> None:
    (Path(ckpt_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)


def was_preempted(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / PREEMPTED_MARKER).is_file()
