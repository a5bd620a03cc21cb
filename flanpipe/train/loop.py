"""Instruction tuning with Megatron-Core: the training spine, launched by torchrun.

    torchrun --standalone --nproc_per_node N -m flanpipe.train.loop \
        --spec SPEC.json --data DIR --out DIR [--ops JSON] [--ckpt-dir DIR]

Four named pieces, as in Megatron-Core's simple training loop example:
1. ``init_distributed``: torch.distributed from the torchrun env + Megatron's TP x PP x DP groups;
2. ``build_model``: this rank's GPTModel stage (flanpipe.model.gpt.model_provider) in Megatron's DDP;
3. a deterministic data iterator over packed rows (flanpipe.train.rows.batch_iterator);
4. ``forward_step`` returning ``(output, partial(loss_func, loss_mask))``, run by whichever
   schedule ``get_forward_backward_func()`` picks (no pipelining, or 1F1B for PP > 1).

``train`` only sequences named steps, as torchtitan's ``Trainer.train`` does: ``set_up`` (layout,
resume point, model, optimizer, data streams), then per step ``train_step`` -> ``RunState.record``
-> ``StepLogger.log`` -> ``maybe_save`` -> ``maybe_stop``, then ``finish`` (final checkpoint,
eval export, done.json).

Loss = token mean over every target token of the global batch: loss_func returns the *sum* of
token losses and the token count (Megatron's per-token-loss mode); finalize_model_grads
divides the summed grads by the global token count across micro-batches and DP ranks.

Output dir: checkpoint/ (dist_checkpointing, reloadable under any TP/PP), model.json,
train_log.jsonl (one line per logged step), tensorboard/ (event files, rank 0) and done.json
(final stats, written last).

Resuming (flanpipe.model.checkpointing): resumable checkpoints (model + optimizer + data position +
RNG + RunState) go to ``--ckpt-dir`` (default ``<out>.ckpt``, outside the output dir that Snakemake
deletes before a rerun) every ``train.save_interval`` steps, at the end, and when SIGTERM arrives:
the current step finishes, a checkpoint is saved and the process exits with status 143
(``PREEMPTED_EXIT_CODE``). Started again with the same command, training resumes from the
newest checkpoint and ends with the same weights, bit for bit on CPU, as an uninterrupted run.
A resume only ever continues the same run: same spec (model, lr, seed, batch...), same packed data
(its content digest, recorded by pack), same tokenizer, same initial weights, same training code
(flanpipe.core.train_config.fingerprint_parts; more steps, another cadence or layout do not count).
A checkpoint of another run, or one past train.steps, is stale: it is removed, training starts
over, and the log says which part changed. Resuming under another TP/PP/DP layout is refused:
optimizer state does not reshard (model weights do: load_model_weights).

``--ops`` carries the operational settings (flanpipe.core.train_config.OPERATIONAL: log and save
cadence, checkpoints kept, TensorBoard, MFU peak, micro-batch, TP/PP layout), which rule train
passes apart from the spec so that changing them retrains nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flanpipe.core import heap
from flanpipe.core.model_config import ModelConfig, flops_per_token, load_model_config, param_count
from flanpipe.core.rerun import stage_version, version_record
from flanpipe.core.train_config import (
    RankGrid,
    TrainConfig,
    changed_parts,
    fingerprint_parts,
    parse_spec,
    plan_layout,
)
from flanpipe.core.train_config import fingerprint as train_fingerprint
from flanpipe.model import checkpointing, megatron_compat
from flanpipe.model.gpt import logits_at, model_provider
from flanpipe.train.optim import build_optimizer, load_optimizer_state, lr_at, optimizer_state, set_lr
from flanpipe.train.rows import PackedDataset, batch_iterator, packed_seq_params, plain_causal

megatron_compat.quiet_warnings()  # before Megatron is first imported (it warns at import)

__all__ = ["RankGrid", "TrainConfig", "parse_spec", "plan_layout", "train", "run", "main"]


def init_distributed(tp: int, pp: int, vpp: int = 1) -> None:
    """torch.distributed from the torchrun env (a 1-process group without it) + Megatron groups.

    gloo on CPU, nccl on GPU, every collective bounded by flanpipe.train.launch.collective_timeout_s (a
    rank lost with its node fails the others within it, not torch's 30 minutes). An existing group is
    reused; Megatron's model-parallel state is rebuilt if it was initialised with other sizes. The process
    keeps freed memory for the next step (flanpipe.core.heap.keep_freed_memory: no kernel page zeroing per step).
    """
    from datetime import timedelta

    from megatron.core import parallel_state

    from flanpipe.train.launch import collective_timeout_s

    heap.keep_freed_memory()
    megatron_compat.apply()
    if tp > 1:
        # Megatron's TP linears overlap the input-grad all-reduce with the weight-grad GEMM and
        # rely on a single CUDA work queue to launch them in that order (read at CUDA init).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=collective_timeout_s())
    if not dist.is_initialized():
        backend = "nccl" if on_gpu else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)  # env:// rendezvous set up by torchrun or srun
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) == vpp
        )
        if same:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        # Megatron's TP/PP/DP groups carry their own timeout (default 30 minutes), not the default group's
        distributed_timeout_minutes=timeout.total_seconds() / 60,
    )


def build_model(cfg: ModelConfig, train: TrainConfig, *, load_init: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks, seeded like Megatron, each in Megatron's DDP: one chunk (its pipeline
    stage), or ``vpp`` chunks for the interleaved schedule.

    DDP even at DP=1: its contiguous grad buffers are what finalize_model_grads all-reduces over
    DP and rescales by the global token count. In bf16 each chunk sits in Megatron's Float16Module
    (casts the first stage's float inputs to bf16 and the last stage's output back to fp32).
    ``load_init=False`` skips train.init_checkpoint (a resumed run's weights come from its own
    checkpoint).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    # Megatron seeds each pipeline stage differently (seed + 100 x pp_rank) so that stages do not
    # draw identical initial layers from the same generator state.
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(train.seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(train.seed + 100 * pp_rank)

    vpp = train.virtual_pipeline_model_parallel_size
    bf16 = train.precision == "bf16"
    init_dir = Path(train.init_checkpoint) if train.init_checkpoint and load_init else None
    if init_dir is not None and load_model_config(init_dir / "model.json") != cfg:
        raise ValueError(f"{init_dir}/model.json differs from this run's model config")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    models = [
        model_provider(
            cfg,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            tp=train.tensor_model_parallel_size,
            pp=train.pipeline_model_parallel_size,
            vp_stage=vp_stage,
            vpp=vpp,
            bf16=bf16,
        )
        for vp_stage in (range(vpp) if vpp > 1 else [None])
    ]
    if torch.cuda.is_available():
        for model in models:
            model.cuda(torch.cuda.current_device())
    if init_dir is not None:  # fp32 or bf16 weights load into either (dist_checkpointing casts)
        checkpointing.load_weights(models, init_dir / "checkpoint")
    chunks = []
    for model in models:
        wrapped = Float16Module(model.config, model) if bf16 else model
        ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=wrapped)
        ddp_model.flanpipe_uses_te = model.flanpipe_uses_te
        chunks.append(ddp_model)
    # Hooks the schedules call (they read chunk 0's config): skip the DP grad sync on all but the
    # last micro-batch, then sync, all-reduce embedding/layernorm grads and divide by the global
    # target-token count.
    config = chunks[0].config
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return chunks


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(summed loss, target tokens, report) for Megatron's per-token-loss reduction.

    ``output_tensor`` is GPTModel's per-token cross entropy [b, s]. The report is a detached
    copy: the schedule may rescale the returned loss in place.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module, *, uses_te: bool = False):
    """One micro-batch through this stage: ``(output, partial(loss_func, loss_mask))``.

    Every stage reads the batch (it is cheap): the first needs tokens, all need positions and the
    mask (none when every row is one document: rows.plain_causal), the last needs labels. With the
    Transformer Engine spec the micro-batch is flattened to one [1, b*s] THD sequence described by
    cu_seqlens instead of a dense mask.
    """
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    if uses_te:
        params = packed_seq_params(batch["segments"])
        flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        output = model(
            flat["tokens"],
            flat["position_ids"],
            None,
            labels=flat["labels"],
            packed_seq_params=params,
        )
        return output, partial(loss_func, flat["loss_mask"])
    mask = batch["attention_mask"]
    mask = None if plain_causal(mask) else mask  # rows of one document each: the model's causal default
    head = output_layer(model)
    labels, loss_mask, at = target_positions(batch["labels"], batch["loss_mask"], head)
    with logits_at(head, at):
        output = model(batch["tokens"], batch["position_ids"], mask, labels=labels)
    return output, partial(loss_func, loss_mask)


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The GPTModel's output layer inside Megatron's DDP (and Float16Module), or None on a stage without one."""
    while not hasattr(model, "output_layer") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return getattr(model, "output_layer", None)


def target_positions(
    labels: torch.Tensor, loss_mask: torch.Tensor, head: torch.nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(labels, loss mask, gpt.logits_at positions) for the last stage to score only the trained positions.

    Instruction tuning trains on the targets alone: in the default's packed rows a quarter of the positions
    carry loss (FLAN's 1,024 inputs + 256 targets: at most a fifth), and the logits and cross entropy of the
    rest are multiplied by 0. Scoring the P trained positions alone gives the same loss and gradients up to
    float summation order, minus the output layer's 6 h V FLOPs (forward + backward) and the cross entropy
    at every other position: 1.08x on the default's tuning step, forward + backward, on a CPU (`flanpipe
    bench train` has no such rows: its loss covers every position). The positions go out as one row [P, 1],
    labels and loss-mask values alike. A stage without the output layer, or rows trained everywhere (LM
    pretraining) or nowhere, keep [b, s].
    """
    if head is None:
        return labels, loss_mask, None
    keep = loss_mask != 0
    if bool(keep.all()) or not bool(keep.any()):
        return labels, loss_mask, None
    rows, cols = keep.nonzero(as_tuple=True)
    picked = labels[rows, cols][:, None]  # [P, 1]: GPTModel's [b, s] -> [s, b] transpose meets logits [1, P, V]
    return picked, loss_mask[rows, cols][:, None], (rows[:, None], cols[:, None])


def _reduce_step_stats(data_store: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Global (loss, target tokens) of one step, identical on every rank.

    The last pipeline stage holds [loss_sum, tokens] per micro-batch; sum them, sum over DP,
    then share over the pipeline group (other stages contribute zeros).
    """
    from megatron.core import parallel_state

    stats = torch.zeros(2, dtype=torch.float64)
    for item in data_store:
        stats += item["lm loss"].detach().to("cpu", torch.float64)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    stats = stats.to(device) if device is not None else stats
    dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = stats.tolist()
    return loss_sum / max(tokens, 1.0), tokens


def _resume_point(ckpt_dir: Path, fingerprint: str, steps: int, parts: dict[str, str] | None = None) -> Path | None:
    """The checkpoint to resume from, or None. Stale checkpoints (another run, or past ``steps``)
    are removed so that they can never be mistaken for this run's; the log says why. Collective."""
    path = checkpointing.latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    meta = checkpointing.read_meta(path)
    current = meta.get("format") == checkpointing.FORMAT
    if current and meta["fingerprint"] == fingerprint and meta["step"] <= steps:
        return path
    dist.barrier()  # every rank has read the metadata before rank 0 deletes it
    if dist.get_rank() == 0:
        if not current:
            why = f"checkpoint format {meta.get('format')}, this flanpipe writes {checkpointing.FORMAT}"
        elif meta["fingerprint"] != fingerprint:
            changed = changed_parts(meta.get("fingerprint_parts"), parts or {})
            why = f"another run: its {', '.join(changed) or 'fingerprint'} differ(s) from this run's"
        else:
            why = f"step {meta['step']} > steps {steps}"
        print(
            f"flanpipe.train.loop: starting fresh; removing stale checkpoints in {ckpt_dir} ({path.name}: {why})",
            flush=True,
        )
        checkpointing.remove_checkpoints(ckpt_dir)
    dist.barrier()
    return None


def run_fingerprint(cfg: ModelConfig, tc: TrainConfig, data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """This run's fingerprint parts: spec, packed data (the digest pack recorded in packing.json, else
    computed from the files), tokenizer (recorded by pack), initial weights, training's code version."""
    from flanpipe.data.packing import packed_digest

    stats_path = Path(data_dir) / "packing.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    init = checkpointing.weights_identity(tc.init_checkpoint) if tc.init_checkpoint else None
    return fingerprint_parts(
        cfg.to_dict(),
        dataclasses.asdict(tc),
        data=stats.get("digest") or packed_digest(data_dir),
        tokenizer=stats.get("tokenizer_digest"),
        init=init,
        code=stage_version("train"),
    )


# --------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """What a checkpoint carries besides model/optimizer/RNG, so that a resumed run reports the
    whole run: rank 0's log so far and the totals done.json needs. Checkpointed as the plain dict
    ``to_checkpoint`` returns (checkpoint FORMAT 2's ``train_history`` entry, same keys)."""

    log: list[dict[str, Any]] = field(default_factory=list)
    """One record per logged step (what train_log.jsonl holds)."""
    first_loss: float | None = None
    last_loss: float | None = None
    target_tokens: float = 0.0
    """Loss-bearing tokens seen so far (all ranks, all steps)."""
    wall_s: float = 0.0
    """Training seconds before this session (earlier sessions of a resumed run), then up to the last save."""

    def record(self, step: StepResult) -> None:
        """Fold one step's statistics into the run totals."""
        if self.first_loss is None:
            self.first_loss = step.loss
        self.last_loss = step.loss
        self.target_tokens += step.tokens

    def to_checkpoint(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's statistics, identical on every rank."""

    step: int
    """Steps done after this one (1-based)."""
    lr: float
    loss: float
    """Token-mean loss over the global batch."""
    tokens: float
    """Loss-bearing tokens of the global batch."""
    grad_norm: float


@dataclass
class Run:
    """Everything ``set_up`` builds for one training session on this rank."""

    cfg: ModelConfig
    tc: TrainConfig
    grid: RankGrid
    rank: int
    out_dir: Path
    ckpt_dir: Path
    n_rows: int
    """Packed rows in the data."""
    fingerprint: str
    fingerprint_parts: dict[str, str]
    resume: Path | None
    """The checkpoint this session resumed from."""
    start_step: int
    model: list[torch.nn.Module]
    optimizer: Any
    batches: Any
    """The micro-batch iterator, or one per model chunk (interleaved schedule)."""
    forward_backward: Callable[..., Any]
    uses_te: bool
    state: RunState
    last_saved: int = -1
    """Step of the newest resumable checkpoint of this run (-1: none yet)."""

    @property
    def tokens_per_step(self) -> int:
        """global_batch rows x seq_length tokens (padding included: the model computes it)."""
        return self.tc.global_batch_size * self.tc.seq_length


# --------------------------------------------------------------------------- set up


def set_up(
    spec: dict[str, Any],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str] | None,
    ops: dict[str, Any] | None = None,
) -> Run:
    """Layout, process groups, resume point, model, optimizer and data streams (Megatron-LM's
    ``setup_model_and_optimizer`` plus the data iterators)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, tc = parse_spec(spec, ops)
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    grid = plan_layout(tc, cfg, world)
    init_distributed(grid.tp, grid.pp, grid.vpp)
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else checkpointing.default_ckpt_dir(out_dir)

    dataset = PackedDataset(data_dir)
    if dataset.seq_length != tc.seq_length:
        raise ValueError(f"packed rows are {dataset.seq_length} tokens, train.seq_length={tc.seq_length}")
    parts = run_fingerprint(cfg, tc, data_dir)
    fingerprint = train_fingerprint(parts)
    resume = _resume_point(ckpt_dir, fingerprint, tc.steps, parts)

    model = build_model(cfg, tc, load_init=resume is None)
    optimizer = build_optimizer(
        model,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        clip_grad=tc.clip_grad,
        optimizer=tc.optimizer,
        bf16=tc.precision == "bf16",
        adafactor=tc.adafactor,
    )
    state, start_step = RunState(), 0
    if resume is not None:
        meta, saved, opt_state = checkpointing.load(resume, model_chunks=model)
        load_optimizer_state(optimizer, opt_state)
        state, start_step = RunState.from_checkpoint(saved), meta["step"]
        assert meta["consumed_samples"] == start_step * tc.global_batch_size, meta
    return Run(
        cfg=cfg,
        tc=tc,
        grid=grid,
        rank=dist.get_rank(),
        out_dir=out_dir,
        ckpt_dir=ckpt_dir,
        n_rows=len(dataset),
        fingerprint=fingerprint,
        fingerprint_parts=parts,
        resume=resume,
        start_step=start_step,
        model=model,
        optimizer=optimizer,
        batches=_data_streams(dataset, tc, len(model), consumed_samples=start_step * tc.global_batch_size),
        forward_backward=get_forward_backward_func(),
        uses_te=bool(model[0].flanpipe_uses_te),
        state=state,
        last_saved=start_step if resume is not None else -1,
    )


def _data_streams(dataset: PackedDataset, tc: TrainConfig, chunks: int, *, consumed_samples: int):
    """This rank's micro-batch iterator (one per model chunk when there are several).

    Data position: step t reads global samples [t*G, (t+1)*G), so a resumed run continues the same
    stream at consumed_samples = start_step x global_batch_size. The interleaved schedule wants one
    iterator per model chunk: each chunk reads every micro-batch in order, so they are identical streams.
    """
    from megatron.core import parallel_state

    streams = [
        batch_iterator(
            dataset,
            seed=tc.seed,
            global_batch_size=tc.global_batch_size,
            micro_batch_size=tc.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            consumed_samples=consumed_samples,
        )
        for _ in range(chunks)
    ]
    return streams if chunks > 1 else streams[0]


# --------------------------------------------------------------------------- one step


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step at 0-based ``step``: lr, forward/backward over every micro-batch, update."""
    tc = run.tc
    lr = lr_at(step, lr=tc.lr, warmup_steps=tc.warmup_steps)
    set_lr(run.optimizer, lr)
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    # The pipeline schedule's p2p buffers are [seq, micro_batch, hidden]; THD flattens a micro-batch.
    p2p_seq, p2p_mb = (tc.seq_length * tc.micro_batch_size, 1) if run.uses_te else (tc.seq_length, tc.micro_batch_size)
    data_store = run.forward_backward(
        forward_step_func=partial(forward_step, uses_te=run.uses_te),
        data_iterator=run.batches,
        model=run.model,
        num_microbatches=run.grid.accumulation,
        seq_length=p2p_seq,
        micro_batch_size=p2p_mb,
        forward_only=False,
    )
    _, grad_norm, _ = run.optimizer.step()
    if grad_norm is None:  # clipping off: still report the norm
        grad_norm = run.optimizer.get_grad_norm()
    loss, tokens = _reduce_step_stats(data_store)
    return StepResult(step=step + 1, lr=lr, loss=loss, tokens=tokens, grad_norm=float(grad_norm))


# --------------------------------------------------------------------------- logging


def _tensorboard(out_dir: Path, purge_step: int):
    """A SummaryWriter on out/tensorboard; ``purge_step`` hides events a killed attempt logged
    after the checkpoint this run resumes from."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)


def _log_scalars(writer, record: dict[str, Any]) -> None:
    for key in ("loss", "lr", "grad_norm"):
        writer.add_scalar(f"train/{key}", record[key], record["step"])
    writer.add_scalar("perf/tokens_per_s", record["tokens_per_s"], record["step"])
    writer.add_scalar("perf/mfu", record["mfu"], record["step"])


class StepLogger:
    """Owns what a run reports: the banner, train_log.jsonl, TensorBoard, throughput and MFU, and
    the session clock (Megatron-LM's ``training_log``).

    Batch arithmetic, nanoGPT style. One optimizer step sees
      global_batch rows = micro_batch x DP x accumulation, each row seq_length tokens, so
      tokens/step = global_batch x seq_length (padding included: the model computes it), e.g.
      FLAN's 8,192-token batches = 8 rows x 1,024 tokens (or 4 x 2,048).
    Model FLOPs per step = flops_per_token x tokens/step, spread over `world` devices, so
      MFU = flops_per_token x tokens/s / (world x peak_tflops x 1e12).
    Every rank keeps the records (and the clock); only rank 0 writes files and prints.
    """

    def __init__(self, run: Run):
        self.run = run
        self.flops_per_token = flops_per_token(run.cfg, run.tc.seq_length)
        self.peak_flops = run.grid.world * run.tc.peak_tflops * 1e12
        self.on_cpu = not torch.cuda.is_available()
        self.log_path = run.out_dir / "train_log.jsonl"
        self.writer = None
        self.wall_before = float(run.state.wall_s)
        self.t_start = self.t_last = time.perf_counter()
        self.last_logged = run.start_step

    def open(self) -> None:
        """Rank 0: fresh outputs, the log so far rewritten from the run state, TensorBoard, banner."""
        run, state = self.run, self.run.state
        if run.rank != 0:
            return
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "done.json").unlink(missing_ok=True)  # its presence must mean *this* run finished
        # A resumed run rewrites the log from its checkpoint: whole even if out/ was deleted,
        # and without the steps a killed attempt logged after that checkpoint.
        self.log_path.write_text("".join(json.dumps(r) + "\n" for r in state.log))
        if run.tc.tensorboard:
            replay = not (run.out_dir / "tensorboard").exists()  # deleted (e.g. by Snakemake) or new
            self.writer = _tensorboard(run.out_dir, purge_step=run.start_step + 1)
            for record in state.log if replay else []:
                _log_scalars(self.writer, record)
        print(self.banner(), flush=True)

    def banner(self) -> str:
        run, tc, g, h = self.run, self.run.tc, self.run.grid, self.run.cfg
        tokens_per_step = run.tokens_per_step
        return (
            f"flanpipe.train.loop: {param_count(h):,} params ({h.num_layers} layers, hidden {h.hidden_size},"
            f" {h.num_attention_heads} heads) | world {g.world} = TP {g.tp} x PP {g.pp}"
            f" x DP {g.dp}{f' (VPP {g.vpp} chunks per PP rank)' if g.vpp > 1 else ''}"
            f" | {tc.precision} | {run.n_rows:,} packed rows\n"
            f"flanpipe.train.loop: global batch {tc.global_batch_size} rows = micro {tc.micro_batch_size}"
            f" x DP {g.dp} x accumulation {g.accumulation}; {tc.global_batch_size} rows"
            f" x {tc.seq_length:,} tokens = {tokens_per_step:,}-token global batches;"
            f" {tc.steps:,} steps = {tokens_per_step * tc.steps:,} tokens\n"
            f"flanpipe.train.loop: {self.flops_per_token:,} FLOPs/token (6N + 12 L d_attn T)"
            f" x {tokens_per_step:,} tokens"
            f" = {self.flops_per_token * tokens_per_step:.3e} FLOPs/step; MFU vs {tc.peak_tflops:g} TFLOP/s"
            f" x {g.world} device(s){' (an estimate only: CPU run)' if self.on_cpu else ''}\n"
            f"flanpipe.train.loop: checkpoints in {run.ckpt_dir}"
            + (f" every {tc.save_interval} steps" if tc.save_interval else " at the end")
            + " and on SIGTERM"
            + (f"; resuming from {run.resume.name} (step {run.start_step})" if run.resume is not None else "")
        )

    def start(self) -> None:
        """Start the session clock (just before the first step)."""
        self.t_start = self.t_last = time.perf_counter()

    def elapsed_s(self) -> float:
        """Training seconds of the whole run so far (earlier sessions included)."""
        return self.wall_before + (time.perf_counter() - self.t_start)

    def exclude(self, seconds: float) -> None:
        """Keep ``seconds`` (a checkpoint save) out of the next tokens/s."""
        self.t_last += seconds

    def log(self, result: StepResult) -> None:
        """Log every log_interval steps, and always the first step of a session and the last step."""
        done, tc = result.step, self.run.tc
        if not (done % tc.log_interval == 0 or done in (self.run.start_step + 1, tc.steps)):
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        tokens_per_s = self.run.tokens_per_step * (done - self.last_logged) / (now - self.t_last)
        record = {
            "step": done,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / self.peak_flops,
            "target_tokens": int(result.tokens),
            "elapsed_s": self.wall_before + now - self.t_start,
        }
        self.t_last, self.last_logged = now, done
        self.run.state.log.append(record)
        if self.run.rank != 0:
            return
        print(
            f"step {done:5d} | loss {result.loss:.4f} | lr {result.lr:.2e} | grad norm {result.grad_norm:.3f}"
            f" | {tokens_per_s:,.0f} tok/s | MFU {100 * record['mfu']:.3g}%{' (est.)' if self.on_cpu else ''}",
            flush=True,
        )
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            _log_scalars(self.writer, record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- save / stop


def save(run: Run, logger: StepLogger, done_steps: int) -> Path:
    """A resumable checkpoint after ``done_steps`` steps (collective; Megatron-LM's
    ``save_checkpoint_and_time``: its seconds stay out of the logged tokens/s)."""
    t0 = time.perf_counter()
    run.state.wall_s = logger.elapsed_s()
    path = checkpointing.save(
        run.ckpt_dir,
        done_steps,
        model_chunks=run.model,
        optimizer_state=optimizer_state(run.optimizer),
        consumed_samples=done_steps * run.tc.global_batch_size,
        fingerprint=run.fingerprint,
        fingerprint_parts=run.fingerprint_parts,
        history=run.state.to_checkpoint(),
        keep=run.tc.keep_checkpoints,
    )
    run.last_saved = done_steps
    logger.exclude(time.perf_counter() - t0)
    return path


def maybe_save(run: Run, logger: StepLogger, done_steps: int) -> None:
    """Save every save_interval steps (the last step is saved by ``finish``)."""
    interval = run.tc.save_interval
    if interval and done_steps % interval == 0 and done_steps < run.tc.steps:
        save(run, logger, done_steps)


def maybe_stop(run: Run, logger: StepLogger, stopper: checkpointing.StopOnSignal, done_steps: int) -> None:
    """After SIGTERM reached any rank: save (unless this step just was), mark the checkpoint dir
    preempted and raise ``checkpointing.Preempted``. Collective: every rank stops at the same step."""
    if not stopper.requested():
        return
    saved_now = run.last_saved == done_steps
    path = checkpointing.latest_checkpoint(run.ckpt_dir) if saved_now else save(run, logger, done_steps)
    if run.rank == 0:
        checkpointing.mark_preempted(run.ckpt_dir, done_steps, path)
        print(f"flanpipe.train.loop: SIGTERM: saved {path} at step {done_steps}; exiting", flush=True)
    dist.barrier()  # no rank exits before the marker exists: srun --kill-on-bad-exit ends the rest at the first exit
    raise checkpointing.Preempted(done_steps, path)


# --------------------------------------------------------------------------- finish


def finish(run: Run, logger: StepLogger, wall_s: float) -> dict[str, Any]:
    """End of training: a resumable checkpoint of the final state (to continue with more steps, or to
    finish the outputs below if this process dies first), the weights for evaluation, model.json,
    and done.json last (its presence means the run finished). Returns the final stats."""
    tc = run.tc
    if run.last_saved != tc.steps:
        save(run, logger, tc.steps)
    ckpt_out = run.out_dir / "checkpoint"
    if run.rank == 0 and ckpt_out.exists():
        shutil.rmtree(ckpt_out)
    dist.barrier()
    checkpointing.save_weights([chunk.module for chunk in run.model], ckpt_out)
    dist.barrier()
    stats = run_stats(run, logger, wall_s)
    if run.rank == 0:
        from flanpipe.core.io import write_json

        write_json(run.out_dir / "model.json", run.cfg.to_dict())
        write_json(run.out_dir / "done.json", stats)  # last: its presence means the run finished
    dist.barrier()
    return stats


def run_stats(run: Run, logger: StepLogger, wall_s: float) -> dict[str, Any]:
    """done.json: the whole run's totals (earlier sessions of a resumed run included) and its layout."""
    tc, g, state = run.tc, run.grid, run.state
    tokens_per_step = run.tokens_per_step
    return {
        "steps": tc.steps,
        "first_loss": state.first_loss,
        "final_loss": state.last_loss,
        "tokens": tokens_per_step * tc.steps,
        "target_tokens": int(state.target_tokens),
        "consumed_samples": tc.global_batch_size * tc.steps,
        "wall_s": wall_s,
        "tokens_per_s": tokens_per_step * tc.steps / wall_s,
        "flops_per_token": logger.flops_per_token,
        "mfu": logger.flops_per_token * tokens_per_step * tc.steps / wall_s / logger.peak_flops,
        "resumed_from_step": run.start_step,
        "params": param_count(run.cfg),
        "world_size": g.world,
        "tensor_model_parallel_size": g.tp,
        "pipeline_model_parallel_size": g.pp,
        "virtual_pipeline_model_parallel_size": g.vpp,
        "data_parallel_size": g.dp,
        "precision": tc.precision,
        "accumulation_steps": g.accumulation,
        "global_batch_size": tc.global_batch_size,
        "micro_batch_size": tc.micro_batch_size,
        "seq_length": tc.seq_length,
        "fingerprint": run.fingerprint,  # what a run starting from these weights resumes on (weights_identity)
        **version_record("train"),
    }


# --------------------------------------------------------------------------- the loop


def train(
    spec: dict[str, Any],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str] | None = None,
    ops: dict[str, Any] | None = None,
):
    """Train (resuming from ``ckpt_dir`` when it holds this run's checkpoint), save and return
    ``(model_chunks, final stats)``; leaves the process groups up. ``ops``: the operational settings.

    Raises ``checkpointing.Preempted`` after saving a checkpoint when SIGTERM arrived.
    """
    run = set_up(spec, data_dir, out_dir, ckpt_dir, ops)
    logger = StepLogger(run)
    stopper = checkpointing.StopOnSignal()
    try:
        logger.open()
        logger.start()
        with stopper:
            for step in range(run.start_step, run.tc.steps):
                result = train_step(run, step)
                run.state.record(result)
                logger.log(result)
                maybe_save(run, logger, result.step)
                maybe_stop(run, logger, stopper, result.step)  # raises Preempted after saving
    finally:
        logger.close()
    wall_s = logger.elapsed_s()
    return run.model, finish(run, logger, wall_s)


def run(
    spec: dict[str, Any],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str] | None = None,
    ops: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train per ``spec`` (and ``ops``) on packed rows in ``data_dir``; write outputs to ``out_dir``; return stats.

    Tears down the process groups it created (a caller's existing group is left alone).
    """
    owns_group = not dist.is_initialized()
    try:
        _, stats = train(spec, data_dir, out_dir, ckpt_dir, ops)
    finally:
        if owns_group and dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flanpipe.train.loop", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="train_spec.json ({model: ..., train: ...})")
    parser.add_argument("--data", required=True, help="packed data directory (tokens/segments/loss_mask)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--ops",
        type=json.loads,
        default=None,
        help="JSON of operational settings (log/save cadence, micro-batch, TP/PP...) over the spec's train block",
    )
    parser.add_argument(
        "--ckpt-dir",
        default=None,
        help="resumable checkpoints (default: OUT.ckpt next to OUT, which Snakemake does not delete)",
    )
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    try:
        run(spec, args.data, args.out, args.ckpt_dir, args.ops)
    except checkpointing.Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"flanpipe.train.loop: {stop}", file=sys.stderr, flush=True)
        return checkpointing.PREEMPTED_EXIT_CODE
    return 0


# dist_checkpointing's spawn-mode writer re-imports __main__: keep the entry point guarded.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
