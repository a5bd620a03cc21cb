"""Instruction tuning with Megatron-Core: the training spine, launched by torchrun.

    torchrun --standalone --nproc_per_node N -m flanpipe.train --spec SPEC.json --data DIR --out DIR [--ckpt-dir DIR]

Four named pieces, as in Megatron-Core's simple training loop example:
1. ``init_distributed``: torch.distributed from the torchrun env + Megatron's TP x PP x DP groups;
2. ``build_model``: this rank's GPTModel stage (flanpipe.model.model_provider) in Megatron's DDP;
3. a deterministic data iterator over packed rows (flanpipe.data.batch_iterator);
4. ``forward_step`` returning ``(output, partial(loss_func, loss_mask))``, run by whichever
   schedule ``get_forward_backward_func()`` picks (no pipelining, or 1F1B for PP > 1).

Loss = token mean over every target token of the global batch: loss_func returns the *sum* of
token losses and the token count (Megatron's per-token-loss mode); finalize_model_grads
divides the summed grads by the global token count across micro-batches and DP ranks.

Output dir: checkpoint/ (dist_checkpointing, reloadable under any TP/PP), model.json,
train_log.jsonl (one line per logged step), tensorboard/ (event files, rank 0) and done.json
(final stats, written last).

Resuming (flanpipe.checkpointing): resumable checkpoints (model + optimizer + data position +
RNG) go to ``--ckpt-dir`` (default ``<out>.ckpt``, outside the output dir that Snakemake deletes
before a rerun) every ``train.save_interval`` steps, at the end, and when SIGTERM arrives: the
current step finishes, a checkpoint is saved and the process exits with status 143
(``PREEMPTED_EXIT_CODE``). Started again with the same command, training resumes from the
newest checkpoint and ends with the same weights, bit for bit on CPU, as an uninterrupted run.
A checkpoint of another run (other model, data, lr, seed, batch...: see
checkpointing.fingerprint; more steps, another cadence or layout do not count) or one past
train.steps is stale: it is removed and training starts over. Resuming under another TP/PP/DP
layout is refused: optimizer state does not reshard (model weights do: load_model_weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flanpipe import checkpointing, megatron_compat
from flanpipe.data import PackedDataset, batch_iterator, packed_seq_params
from flanpipe.model import load_checkpoint, model_provider, save_checkpoint
from flanpipe.model_config import ModelConfig, load_model_config, param_count
from flanpipe.optim import build_optimizer, lr_at, set_lr

megatron_compat.quiet_warnings()  # before Megatron is first imported (it warns at import)


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` block of train_spec.json."""

    steps: int
    """Optimizer steps."""

    lr: float
    """Peak learning rate (Adafactor: relative to parameter scale, see flanpipe.optim)."""

    micro_batch_size: int
    """Packed rows per forward pass on one rank."""

    global_batch_size: int
    """Packed rows per optimizer step = micro_batch_size x DP size x accumulation steps."""

    seq_length: int
    """Tokens per packed row; must equal the packed data's row length."""

    warmup_steps: int = 0
    """Linear warmup steps before the constant lr."""

    seed: int = 1234
    """Seeds weight init, Megatron's RNG tracker and the row shuffle."""

    log_interval: int = 10
    """Log every this many steps (the first and last steps are always logged)."""

    tensor_model_parallel_size: int = 1
    """TP: each layer's matrices split over this many ranks."""

    pipeline_model_parallel_size: int = 1
    """PP: layers split into this many stages (1F1B schedule)."""

    virtual_pipeline_model_parallel_size: int = 1
    """Model chunks per PP rank (> 1: Megatron's interleaved 1F1B). Each rank holds ``vpp`` chunks of
    num_layers / (pp x vpp) layers, round-robin over the ranks, which cuts the pipeline bubble from
    (pp - 1) / m to (pp - 1) / (vpp x m) for m micro-batches, at vpp x the p2p traffic. Needs the
    micro-batches per step to be a multiple of pp."""

    precision: str = "fp32"
    """fp32, or bf16: bf16 parameters and activations, fp32 master weights in the optimizer and fp32
    gradient reduction (Megatron's mixed precision; what a GPU run uses)."""

    optimizer: str = "adafactor"
    """adafactor (FLAN) or adam (AdamW)."""

    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (not biases / norms)."""

    clip_grad: float = 1.0
    """Clip by global grad norm; 0 disables."""

    init_checkpoint: str | None = None
    """Optional run directory (model.json + checkpoint/) whose weights start training,
    e.g. a pretrained LM to instruction-tune. Its model config must equal this run's."""

    save_interval: int = 0
    """Save a resumable checkpoint every this many steps; 0: only at the end and on SIGTERM."""

    keep_checkpoints: int = 2
    """Resumable checkpoints kept in the checkpoint dir (the newest ones)."""

    tensorboard: bool = True
    """Write TensorBoard event files to out/tensorboard (rank 0)."""

    peak_tflops: float = 989.0
    """Peak dense TFLOP/s of one device, the MFU denominator (H100 SXM bf16: 989). Meaningless
    on CPU, where the logged MFU is only an estimate against this number."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "micro_batch_size",
            "global_batch_size",
            "seq_length",
            "log_interval",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("train.warmup_steps must be >= 0")
        if self.save_interval < 0:
            raise ValueError("train.save_interval must be >= 0")
        if not self.peak_tflops > 0:
            raise ValueError("train.peak_tflops must be > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.virtual_pipeline_model_parallel_size < 1:
            raise ValueError("train.virtual_pipeline_model_parallel_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown train spec keys: {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class Layout:
    """How the world splits: world = TP x PP x DP, and the batch arithmetic that follows."""

    world: int
    tp: int
    pp: int
    dp: int
    accumulation: int
    """Micro-batches per rank per step = global_batch / (micro_batch x dp)."""
    vpp: int = 1
    """Model chunks per PP rank (interleaved schedule when > 1)."""


def plan_layout(train: TrainConfig, model: ModelConfig, world: int) -> Layout:
    """Check and write out the batch arithmetic before any process group exists.

    global_batch = micro_batch x dp x accumulation, with dp = world / (tp x pp).
    """
    tp, pp = train.tensor_model_parallel_size, train.pipeline_model_parallel_size
    vpp = train.virtual_pipeline_model_parallel_size
    model.check_parallel(tp, pp, vpp)
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP x PP = {tp} x {pp}")
    dp = world // (tp * pp)
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={train.global_batch_size} must be a multiple of "
            f"micro_batch_size x dp = {train.micro_batch_size} x {dp}"
        )
    accumulation = train.global_batch_size // per_step
    assert train.global_batch_size == train.micro_batch_size * dp * accumulation
    if vpp > 1 and accumulation % pp:
        # Megatron's interleaved schedule runs micro-batches in groups of pp per model chunk
        raise ValueError(
            f"virtual pipeline: micro-batches per step ({accumulation} = global_batch_size "
            f"{train.global_batch_size} / (micro_batch_size {train.micro_batch_size} x dp {dp})) must be "
            f"a multiple of pipeline_model_parallel_size={pp}"
        )
    if train.seq_length > model.max_position_embeddings:
        raise ValueError(f"seq_length={train.seq_length} > max_position_embeddings={model.max_position_embeddings}")
    return Layout(world=world, tp=tp, pp=pp, dp=dp, accumulation=accumulation, vpp=vpp)


def parse_spec(spec: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Split train_spec.json into its validated model and train configs."""
    unknown = sorted(set(spec) - {"model", "train"})
    if unknown:
        raise ValueError(f"unknown train spec sections: {unknown}")
    return ModelConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"])


def flops_per_token(cfg: ModelConfig, seq_length: int) -> int:
    """Model FLOPs of one training token (forward + backward), as in PaLM (app. B) and nanoGPT.

    Every weight takes part in one multiply-add per token: 2 FLOPs in the forward pass and 4 in
    the backward (the gradient of the input and of the weight), so 6 N, with N the parameters
    used in a matmul: all of them except the input embedding tables (a lookup costs nothing;
    the untied output layer is a matmul and counts). Attention adds two matmuls per layer that
    have no weights: scores Q K^T and the weighted sum A V, each 2 x T x d_attn FLOPs per token
    forward (d_attn = heads x kv_channels, T = seq_length: the dense attention computes every
    column of the packed row, masked or not), x 3 with the backward: 12 x L x d_attn x T.

        flops/token = 6 N + 12 L d_attn T
    """
    h = cfg.hidden_size
    lookups = cfg.vocab_size * h + (cfg.max_position_embeddings * h if cfg.position_embedding_type != "rope" else 0)
    n_matmul = param_count(cfg) - lookups
    d_attn = cfg.num_attention_heads * cfg.kv_channels
    return 6 * n_matmul + 12 * cfg.num_layers * d_attn * seq_length


def init_distributed(tp: int, pp: int, vpp: int = 1) -> None:
    """torch.distributed from the torchrun env (a 1-process group without it) + Megatron groups.

    gloo on CPU, nccl on GPU. An existing group is reused; Megatron's model-parallel state is
    rebuilt if it was initialised with other sizes.
    """
    from megatron.core import parallel_state

    megatron_compat.apply()
    if tp > 1:
        # Megatron's TP linears overlap the input-grad all-reduce with the weight-grad GEMM and
        # rely on a single CUDA work queue to launch them in that order (read at CUDA init).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if on_gpu else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)  # env:// rendezvous set up by torchrun
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
        load_checkpoint(models, init_dir / "checkpoint")
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
    mask, the last needs labels. With the Transformer Engine spec the micro-batch is flattened
    to one [1, b*s] THD sequence described by cu_seqlens instead of a dense mask.
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
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


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


def _resume_point(ckpt_dir: Path, fingerprint: str, steps: int) -> Path | None:
    """The checkpoint to resume from, or None. Stale checkpoints (another spec, or past ``steps``)
    are removed so that they can never be mistaken for this run's. Collective."""
    path = checkpointing.latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    meta = checkpointing.read_meta(path)
    current = meta.get("format") == checkpointing.FORMAT
    if current and meta["fingerprint"] == fingerprint and meta["step"] <= steps:
        return path
    dist.barrier()  # every rank has read the metadata before rank 0 deletes it
    if dist.get_rank() == 0:
        why = (
            f"checkpoint format {meta.get('format')}, this flanpipe writes {checkpointing.FORMAT}"
            if not current
            else "another spec"
            if meta["fingerprint"] != fingerprint
            else f"step {meta['step']} > steps {steps}"
        )
        print(f"flanpipe.train: removing stale checkpoints in {ckpt_dir} ({path.name}: {why})", flush=True)
        checkpointing.remove_checkpoints(ckpt_dir)
    dist.barrier()
    return None


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


def train(
    spec: dict[str, Any],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str] | None = None,
):
    """Train (resuming from ``ckpt_dir`` when it holds this run's checkpoint), save and return
    ``(model_chunks, final stats)``; leaves the process groups up.

    Raises ``checkpointing.Preempted`` after saving a checkpoint when SIGTERM arrived.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, tc = parse_spec(spec)
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    layout = plan_layout(tc, cfg, world)
    init_distributed(layout.tp, layout.pp, layout.vpp)
    rank = dist.get_rank()
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else checkpointing.default_ckpt_dir(out_dir)

    dataset = PackedDataset(data_dir)
    if dataset.seq_length != tc.seq_length:
        raise ValueError(f"packed rows are {dataset.seq_length} tokens, train.seq_length={tc.seq_length}")
    fingerprint = checkpointing.fingerprint(cfg.to_dict(), dataclasses.asdict(tc), len(dataset))
    resume = _resume_point(ckpt_dir, fingerprint, tc.steps)

    model = build_model(cfg, tc, load_init=resume is None)
    uses_te = bool(model[0].flanpipe_uses_te)
    optimizer = build_optimizer(
        model,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        clip_grad=tc.clip_grad,
        optimizer=tc.optimizer,
        bf16=tc.precision == "bf16",
    )
    # What a checkpoint carries besides model/optimizer/RNG: rank 0's log so far and the totals
    # done.json needs, so that a resumed run reports the whole run.
    history: dict[str, Any] = {"log": [], "first_loss": None, "last_loss": None, "target_tokens": 0.0, "wall_s": 0.0}
    start_step = 0
    if resume is not None:
        meta, history = checkpointing.load(resume, model_chunks=model, optimizer=optimizer)
        start_step = meta["step"]
        assert meta["consumed_samples"] == start_step * tc.global_batch_size, meta
    # Data position: step t reads global samples [t*G, (t+1)*G), so a resumed run continues the
    # same stream at consumed_samples = start_step x global_batch_size.
    # The interleaved schedule wants one iterator per model chunk: each chunk reads every micro-batch
    # in order, so they are identical streams.
    streams = [
        batch_iterator(
            dataset,
            seed=tc.seed,
            global_batch_size=tc.global_batch_size,
            micro_batch_size=tc.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            consumed_samples=start_step * tc.global_batch_size,
        )
        for _ in model
    ]
    batches = streams if len(model) > 1 else streams[0]
    forward_backward = get_forward_backward_func()
    # The pipeline schedule's p2p buffers are [seq, micro_batch, hidden]; THD flattens a micro-batch.
    p2p_seq, p2p_mb = (tc.seq_length * tc.micro_batch_size, 1) if uses_te else (tc.seq_length, tc.micro_batch_size)

    # Batch arithmetic, nanoGPT style. One optimizer step sees
    #   global_batch rows = micro_batch x DP x accumulation, each row seq_length tokens, so
    #   tokens/step = global_batch x seq_length (padding included: the model computes it), e.g.
    #   FLAN's 8,192-token batches = 8 rows x 1,024 tokens (or 4 x 2,048).
    # Model FLOPs per step = flops_per_token x tokens/step, spread over `world` devices, so
    #   MFU = flops_per_token x tokens/s / (world x peak_tflops x 1e12).
    tokens_per_step = tc.global_batch_size * tc.seq_length
    flops_tok = flops_per_token(cfg, tc.seq_length)
    peak_flops = layout.world * tc.peak_tflops * 1e12
    on_cpu = not torch.cuda.is_available()

    log_path = out_dir / "train_log.jsonl"
    writer = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "done.json").unlink(missing_ok=True)  # its presence must mean *this* run finished
        # A resumed run rewrites the log from its checkpoint: whole even if out/ was deleted,
        # and without the steps a killed attempt logged after that checkpoint.
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history["log"]))
        if tc.tensorboard:
            replay = not (out_dir / "tensorboard").exists()  # deleted (e.g. by Snakemake) or new
            writer = _tensorboard(out_dir, purge_step=start_step + 1)
            for record in history["log"] if replay else []:
                _log_scalars(writer, record)
        h = cfg
        print(
            f"flanpipe.train: {param_count(cfg):,} params ({h.num_layers} layers, hidden {h.hidden_size},"
            f" {h.num_attention_heads} heads) | world {layout.world} = TP {layout.tp} x PP {layout.pp}"
            f" x DP {layout.dp}{f' (VPP {layout.vpp} chunks per PP rank)' if layout.vpp > 1 else ''}"
            f" | {tc.precision} | {len(dataset):,} packed rows\n"
            f"flanpipe.train: global batch {tc.global_batch_size} rows = micro {tc.micro_batch_size}"
            f" x DP {layout.dp} x accumulation {layout.accumulation}; {tc.global_batch_size} rows"
            f" x {tc.seq_length:,} tokens = {tokens_per_step:,}-token global batches;"
            f" {tc.steps:,} steps = {tokens_per_step * tc.steps:,} tokens\n"
            f"flanpipe.train: {flops_tok:,} FLOPs/token (6N + 12 L d_attn T) x {tokens_per_step:,} tokens"
            f" = {flops_tok * tokens_per_step:.3e} FLOPs/step; MFU vs {tc.peak_tflops:g} TFLOP/s x {layout.world}"
            f" device(s){' (an estimate only: CPU run)' if on_cpu else ''}\n"
            f"flanpipe.train: checkpoints in {ckpt_dir}"
            + (f" every {tc.save_interval} steps" if tc.save_interval else " at the end")
            + " and on SIGTERM"
            + (f"; resuming from {resume.name} (step {start_step})" if resume is not None else ""),
            flush=True,
        )

    def save(done_steps: int) -> Path:
        history["wall_s"] = wall_before + (time.perf_counter() - t_start)
        return checkpointing.save(
            ckpt_dir,
            done_steps,
            model_chunks=model,
            optimizer=optimizer,
            consumed_samples=done_steps * tc.global_batch_size,
            fingerprint=fingerprint,
            history=history,
            keep=tc.keep_checkpoints,
        )

    wall_before = float(history["wall_s"])
    t_start = t_last = time.perf_counter()
    last_logged = start_step
    last_saved = start_step if resume is not None else -1
    stopper = checkpointing.StopOnSignal()
    try:
        with stopper:
            for step in range(start_step, tc.steps):
                lr = lr_at(step, lr=tc.lr, warmup_steps=tc.warmup_steps)
                set_lr(optimizer, lr)
                for chunk in model:
                    chunk.zero_grad_buffer()
                optimizer.zero_grad()
                data_store = forward_backward(
                    forward_step_func=partial(forward_step, uses_te=uses_te),
                    data_iterator=batches,
                    model=model,
                    num_microbatches=layout.accumulation,
                    seq_length=p2p_seq,
                    micro_batch_size=p2p_mb,
                    forward_only=False,
                )
                _, grad_norm, _ = optimizer.step()
                if grad_norm is None:  # clipping off: still report the norm
                    grad_norm = optimizer.get_grad_norm()
                loss, tokens = _reduce_step_stats(data_store)
                if history["first_loss"] is None:
                    history["first_loss"] = loss
                history["last_loss"] = loss
                history["target_tokens"] += tokens

                done_steps = step + 1
                if done_steps % tc.log_interval == 0 or done_steps in (start_step + 1, tc.steps):
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    tokens_per_s = tokens_per_step * (done_steps - last_logged) / (now - t_last)
                    record = {
                        "step": done_steps,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tokens_per_s,
                        "mfu": flops_tok * tokens_per_s / peak_flops,
                        "target_tokens": int(tokens),
                        "elapsed_s": wall_before + now - t_start,
                    }
                    t_last, last_logged = now, done_steps
                    history["log"].append(record)
                    if rank == 0:
                        print(
                            f"step {done_steps:5d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f}"
                            f" | {tokens_per_s:,.0f} tok/s | MFU {100 * record['mfu']:.3g}%"
                            f"{' (est.)' if on_cpu else ''}",
                            flush=True,
                        )
                        with log_path.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                        if writer is not None:
                            _log_scalars(writer, record)

                if tc.save_interval and done_steps % tc.save_interval == 0 and done_steps < tc.steps:
                    t0 = time.perf_counter()
                    save(done_steps)
                    last_saved = done_steps
                    t_last += time.perf_counter() - t0  # keep save time out of tokens/s
                if stopper.requested():  # collective: every rank stops at the same step
                    path = save(done_steps) if last_saved != done_steps else checkpointing.latest_checkpoint(ckpt_dir)
                    if rank == 0:
                        checkpointing.mark_preempted(ckpt_dir, done_steps, path)
                        print(f"flanpipe.train: SIGTERM: saved {path} at step {done_steps}; exiting", flush=True)
                    raise checkpointing.Preempted(done_steps, path)
    finally:
        if writer is not None:
            writer.close()
    session_s = time.perf_counter() - t_start
    wall_s = wall_before + session_s

    # End of training: a resumable checkpoint of the final state (to continue with more steps,
    # or to finish the outputs below if this process dies first), then the model for evaluation.
    if last_saved != tc.steps:
        save(tc.steps)
    ckpt_out = out_dir / "checkpoint"
    if rank == 0 and ckpt_out.exists():
        shutil.rmtree(ckpt_out)
    dist.barrier()
    save_checkpoint([chunk.module for chunk in model], ckpt_out)
    dist.barrier()

    stats = {
        "steps": tc.steps,
        "first_loss": history["first_loss"],
        "final_loss": history["last_loss"],
        "tokens": tokens_per_step * tc.steps,
        "target_tokens": int(history["target_tokens"]),
        "consumed_samples": tc.global_batch_size * tc.steps,
        "wall_s": wall_s,
        "tokens_per_s": tokens_per_step * tc.steps / wall_s,
        "flops_per_token": flops_tok,
        "mfu": flops_tok * tokens_per_step * tc.steps / wall_s / peak_flops,
        "resumed_from_step": start_step,
        "params": param_count(cfg),
        "world_size": layout.world,
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "virtual_pipeline_model_parallel_size": layout.vpp,
        "data_parallel_size": layout.dp,
        "precision": tc.precision,
        "accumulation_steps": layout.accumulation,
        "global_batch_size": tc.global_batch_size,
        "micro_batch_size": tc.micro_batch_size,
        "seq_length": tc.seq_length,
    }
    if rank == 0:
        from flanpipe.io import write_json

        write_json(out_dir / "model.json", cfg.to_dict())
        write_json(out_dir / "done.json", stats)  # last: its presence means the run finished
    dist.barrier()
    return model, stats


def run(
    spec: dict[str, Any],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train per ``spec`` on packed rows in ``data_dir``; write outputs to ``out_dir``; return stats.

    Tears down the process groups it created (a caller's existing group is left alone).
    """
    owns_group = not dist.is_initialized()
    try:
        _, stats = train(spec, data_dir, out_dir, ckpt_dir)
    finally:
        if owns_group and dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flanpipe.train", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="train_spec.json ({model: ..., train: ...})")
    parser.add_argument("--data", required=True, help="packed data directory (tokens/segments/loss_mask)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--ckpt-dir",
        default=None,
        help="resumable checkpoints (default: OUT.ckpt next to OUT, which Snakemake does not delete)",
    )
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    try:
        run(spec, args.data, args.out, args.ckpt_dir)
    except checkpointing.Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"flanpipe.train: {stop}", file=sys.stderr, flush=True)
        return checkpointing.PREEMPTED_EXIT_CODE
    return 0


# dist_checkpointing's spawn-mode writer re-imports __main__: keep the entry point guarded.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
