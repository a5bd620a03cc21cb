"""Checkpoint I/O: resumable training checkpoints (save, find, load, stop cleanly on SIGTERM) and
the weights-only checkpoint a run leaves for evaluation (``save_weights`` / ``load_weights``).

Layout of a checkpoint directory (default ``<out>.ckpt``, a sibling of the run's output dir,
because Snakemake deletes a job's outputs before it reruns the job):

    <ckpt>/iter_0000200/    one dist_checkpointing (torch_dist) checkpoint per saved step
    <ckpt>/iter_0000400/
    <ckpt>/latest           text "iter_0000400": the newest complete checkpoint

A save writes ``iter_XXXXXXX.tmp`` (every rank its shards), renames it once every rank has
finished, then replaces ``latest`` atomically (write a temp file, fsync, rename), then prunes
all but the newest ``keep`` checkpoints. A process killed at any point leaves either the old
``latest`` or the new one, never a half-written checkpoint behind the pointer.

What one checkpoint holds:
- ``model``: the model's own sharded state dict (ShardedTensors): weights reshard freely, so a
  checkpoint saved at TP=2 loads at TP=1 or PP=2 (``load_model_weights``);
- ``optimizer``: this rank's optimizer state_dict as a ShardedObject keyed by (pp_rank, tp_rank),
  written once per DP replica group (identical across DP ranks). Adafactor's factored row/column
  statistics are per-shard tensors of a different shape than the weights, so optimizer state is
  NOT resharded: resuming requires the layout it was saved with (checked, with a clear error);
- ``rng_state``: python, numpy, torch CPU (and CUDA) generators and Megatron's RNG tracker, per
  (pp_rank, tp_rank, dp_rank);
- ``train_history``: the logged records so far (rank 0's), so a resumed run's train_log.jsonl
  is whole even when Snakemake deleted the output dir;
- ``flanpipe`` (common to all ranks): step, consumed samples (the data position), the
  TP/PP/DP layout and a fingerprint of everything in the spec that changes the trajectory.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flanpipe.core.model_config import CHECKPOINT_FILES
from flanpipe.core.preemption import (  # noqa: F401 (re-exported: checkpointing's names for the run's files)
    PREEMPTED_EXIT_CODE,
    PREEMPTED_MARKER,
    clear_preempted,
    default_ckpt_dir,
    fsync_dir,
    mark_preempted,
    was_preempted,
    write_atomic,
)

FORMAT = 2  # 2: optimizer entry = {inner torch state, bf16 master weights}; layout has vpp; model chunks
ITER_RE = re.compile(r"^iter_(\d{7})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).exists() for name in CHECKPOINT_FILES)


def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` names; if it is missing or broken, the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        path = ckpt_dir / pointer.read_text().strip()
        if ITER_RE.match(path.name) and _complete(path):
            return path
    found = sorted(p for p in ckpt_dir.glob("iter_*") if ITER_RE.match(p.name) and _complete(p))
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    m = ITER_RE.match(path.name)
    if m is None:
        raise ValueError(f"not a checkpoint directory name: {path}")
    return int(m.group(1))


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any leftover temp dirs."""
    done = sorted(p for p in ckpt_dir.glob("iter_*") if ITER_RE.match(p.name))
    for path in done[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for tmp in ckpt_dir.glob("iter_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def remove_checkpoints(ckpt_dir: Path) -> None:
    """Drop every checkpoint of ``ckpt_dir`` (a stale run's): iter dirs, temp dirs, pointer."""
    for path in ckpt_dir.glob("iter_*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("latest", "latest.tmp"):
        (ckpt_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- state pieces


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _ranks() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)  # Megatron DDP -> the GPTModel


def _sharded_state(model_chunks, *, optimizer_state: Any = None, history: Any = None, data: bool) -> dict[str, Any]:
    """The dict dist_checkpointing saves (``data=True``) or loads into (ShardedObject data None).

    ``optimizer_state`` is the trainer's picklable optimizer state (flanpipe.train.optim.optimizer_state):
    checkpoint I/O stores and returns it without knowing the optimizer."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    r = _ranks()

    state: dict[str, Any] = {"model": chunks_sharded_state([_unwrap(c) for c in model_chunks])}
    state["optimizer"] = ShardedObject(
        "optimizer",
        optimizer_state if data else None,
        (r["pp"], r["tp"]),
        (r["pp_rank"], r["tp_rank"]),
        replica_id=r["dp_rank"],  # identical on every DP rank: one copy written
    )
    state["rng_state"] = ShardedObject(
        "rng_state",
        rng_state() if data else None,
        (r["pp"], r["tp"], r["dp"]),
        (r["pp_rank"], r["tp_rank"], r["dp_rank"]),
        replica_id=0,
    )
    state["train_history"] = ShardedObject(
        "train_history",
        history if data else None,
        (1,),
        (0,),
        replica_id=dist.get_rank(),  # rank 0's copy is written; every rank reads it
    )
    return state


def layout() -> dict[str, int]:
    r = _ranks()
    return {"tp": r["tp"], "pp": r["pp"], "dp": r["dp"], "vpp": r["vpp"]}


def save(
    ckpt_dir: str | os.PathLike[str],
    step: int,
    *,
    model_chunks,
    optimizer_state: Any,
    consumed_samples: int,
    fingerprint: str,
    history: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Save a resumable checkpoint for ``step`` atomically (collective); return its path."""
    from megatron.core import dist_checkpointing

    from flanpipe.model import megatron_compat

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iter_name(step)
    tmp = ckpt_dir / (iter_name(step) + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer_state=optimizer_state, history=history, data=True)
    state["flanpipe"] = {
        "format": FORMAT,
        "step": step,
        "consumed_samples": consumed_samples,
        "layout": layout(),
        "fingerprint": fingerprint,
    }
    megatron_compat.save_results_in_process()
    dist_checkpointing.save(state, str(tmp))  # ends with a barrier: every rank has written
    if dist.get_rank() == 0:
        if final.exists():  # a checkpoint of this step left by an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        write_atomic(ckpt_dir / "latest", final.name + "\n")
        prune(ckpt_dir, keep)
    dist.barrier()
    return final


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The common ``flanpipe`` entry of a checkpoint (step, consumed samples, layout, fingerprint)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))["flanpipe"]


def check_layout(meta: dict[str, Any], path: Path) -> None:
    """Optimizer state is saved per (pp, tp) shard: resuming needs the same TP x PP x DP layout."""
    now = layout()
    if meta["layout"] != now:
        raise RuntimeError(
            f"{path} was saved with layout {meta['layout']}, this run is {now}: optimizer state "
            "(Adafactor's per-shard factored statistics) cannot be resharded. Resume with the saved "
            "layout, or start a new run from its weights (flanpipe.model.checkpointing.load_model_weights "
            "loads them under any layout)."
        )


def load(path: str | os.PathLike[str], *, model_chunks) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Restore model and RNG state from ``path`` (collective); return (meta, history, optimizer state), the
    last for the trainer to load into its optimizer (flanpipe.train.optim.load_optimizer_state)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_meta(path)
    check_layout(meta, path)
    state = dist_checkpointing.load(_sharded_state(model_chunks, data=False), str(path))
    load_chunks_state([_unwrap(c) for c in model_chunks], state["model"])
    set_rng_state(state["rng_state"])
    return meta, state["train_history"], state["optimizer"]


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load only the model weights of a resumable checkpoint, under any TP/PP layout (collective)."""
    from megatron.core import dist_checkpointing

    chunks = [_unwrap(model)]
    state = dist_checkpointing.load({"model": chunks_sharded_state(chunks)}, str(path))
    load_chunks_state(chunks, state["model"])


# --------------------------------------------------------------------------- model weights alone


def chunks_sharded_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """One sharded state dict for a rank's model chunks. Their sharded tensors carry global layer
    numbers, so what one layout saves another loads; dist_checkpointing checks that all ranks together
    touch every shard exactly once, so a rank's chunks must be saved and loaded in one call."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def load_chunks_state(chunks: list[torch.nn.Module], state: dict[str, Any]) -> None:
    """Put a loaded ``chunks_sharded_state`` back into the chunks."""
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def save_weights(model: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike[str]) -> None:
    """Save model weights alone (a run's ``checkpoint/``, what evaluation and ``init_checkpoint`` read)
    with dist_checkpointing: every rank writes its shards (collective).

    A list is the model chunks of an interleaved pipeline; the checkpoint loads into one unsplit model
    (or any other layout) all the same.
    """
    from megatron.core import dist_checkpointing

    from flanpipe.model import megatron_compat

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    megatron_compat.save_results_in_process()
    dist_checkpointing.save(chunks_sharded_state(model if isinstance(model, list) else [model]), str(ckpt_dir))


def load_weights(model: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike[str]) -> None:
    """Load weights ``save_weights`` wrote under any TP/PP layout into ``model`` or a rank's model chunks
    (collective)."""
    from megatron.core import dist_checkpointing

    chunks = model if isinstance(model, list) else [model]
    load_chunks_state(chunks, dist_checkpointing.load(chunks_sharded_state(chunks), str(ckpt_dir)))


# --------------------------------------------------------------------------- SIGTERM


class StopOnSignal:
    """Turn SIGTERM into a request to stop after the current step (install in the main thread).

    The handler only sets a flag; ``requested()`` all-reduces it (MAX) over all ranks at a step
    boundary, so every rank sees the same answer, saves together and exits together even when
    the signal reached them at different moments (or only some of them).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.flag = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ANN001
        self.flag = True
        self.received = signum

    def __enter__(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self) -> bool:
        flag = torch.tensor([1 if self.flag else 0], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Preempted(Exception):  # noqa: N818 - it is an outcome, not an error
    """Training stopped on a signal after saving a resumable checkpoint at ``step``."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped on SIGTERM after step {step}; resumable checkpoint {path}")
        self.step = step
        self.path = path
