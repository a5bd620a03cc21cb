"""Instruction tuning with Megatron-Core: the training spine, launched by torchrun.

    torchrun --standalone --nproc_per_node N -m flanpipe.train --spec SPEC.json --data DIR --out DIR

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
train_log.jsonl (one line per logged step) and done.json (final stats, written last).
"""

from __future__ import annotations

import argparse
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

from flanpipe import megatron_compat
from flanpipe.data import PackedDataset, batch_iterator, packed_seq_params
from flanpipe.model import (
    ModelConfig,
    load_checkpoint,
    load_model_config,
    model_provider,
    param_count,
    save_checkpoint,
)
from flanpipe.optim import build_optimizer, lr_at, set_lr

megatron_compat.quiet_warnings()  # before Megatron is first imported (it warns at import)


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

    optimizer: str = "adafactor"
    """adafactor (FLAN) or adam (AdamW)."""

    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (not biases / norms)."""

    clip_grad: float = 1.0
    """Clip by global grad norm; 0 disables."""

    init_checkpoint: str | None = None
    """Optional run directory (model.json + checkpoint/) whose weights start training,
    e.g. a pretrained LM to instruction-tune. Its model config must equal this run's."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("train.warmup_steps must be >= 0")
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


def plan_layout(train: TrainConfig, model: ModelConfig, world: int) -> Layout:
    """Check and write out the batch arithmetic before any process group exists.

    global_batch = micro_batch x dp x accumulation, with dp = world / (tp x pp).
    """
    tp, pp = train.tensor_model_parallel_size, train.pipeline_model_parallel_size
    model.check_parallel(tp, pp)
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
    if train.seq_length > model.max_position_embeddings:
        raise ValueError(f"seq_length={train.seq_length} > max_position_embeddings={model.max_position_embeddings}")
    return Layout(world=world, tp=tp, pp=pp, dp=dp, accumulation=accumulation)


def parse_spec(spec: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Split train_spec.json into its validated model and train configs."""
    unknown = sorted(set(spec) - {"model", "train"})
    if unknown:
        raise ValueError(f"unknown train spec sections: {unknown}")
    return ModelConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"])


def init_distributed(tp: int, pp: int) -> None:
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
        )
        if same:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def build_model(cfg: ModelConfig, train: TrainConfig) -> list[torch.nn.Module]:
    """This rank's pipeline stage, seeded like Megatron, in Megatron's DDP (a list of one chunk).

    DDP even at DP=1: its contiguous grad buffers are what finalize_model_grads all-reduces over
    DP and rescales by the global token count.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Megatron seeds each pipeline stage differently (seed + 100 x pp_rank) so that stages do not
    # draw identical initial layers from the same generator state.
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(train.seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(train.seed + 100 * pp_rank)

    model = model_provider(
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        tp=train.tensor_model_parallel_size,
        pp=train.pipeline_model_parallel_size,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if train.init_checkpoint:
        init_dir = Path(train.init_checkpoint)
        if load_model_config(init_dir / "model.json") != cfg:
            raise ValueError(f"{init_dir}/model.json differs from this run's model config")
        load_checkpoint(model, init_dir / "checkpoint")

    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    ddp_model.flanpipe_uses_te = model.flanpipe_uses_te
    # Hooks the schedules call: skip the DP grad sync on all but the last micro-batch, then sync,
    # all-reduce embedding/layernorm grads and divide by the global target-token count.
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return [ddp_model]


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


def train(spec: dict[str, Any], data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]):
    """Train, save and return ``(model_chunks, final stats)``; leaves the process groups up."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, tc = parse_spec(spec)
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    layout = plan_layout(tc, cfg, world)
    init_distributed(layout.tp, layout.pp)
    rank = dist.get_rank()
    out_dir = Path(out_dir)

    dataset = PackedDataset(data_dir)
    if dataset.seq_length != tc.seq_length:
        raise ValueError(f"packed rows are {dataset.seq_length} tokens, train.seq_length={tc.seq_length}")

    model = build_model(cfg, tc)
    uses_te = bool(model[0].flanpipe_uses_te)
    optimizer = build_optimizer(
        model, lr=tc.lr, weight_decay=tc.weight_decay, clip_grad=tc.clip_grad, optimizer=tc.optimizer
    )
    batches = batch_iterator(
        dataset,
        seed=tc.seed,
        global_batch_size=tc.global_batch_size,
        micro_batch_size=tc.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    forward_backward = get_forward_backward_func()
    # The pipeline schedule's p2p buffers are [seq, micro_batch, hidden]; THD flattens a micro-batch.
    p2p_seq, p2p_mb = (tc.seq_length * tc.micro_batch_size, 1) if uses_te else (tc.seq_length, tc.micro_batch_size)

    log_path = out_dir / "train_log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        print(
            f"flanpipe.train: {param_count(cfg):,} params | world {layout.world} = TP {layout.tp} x PP {layout.pp}"
            f" x DP {layout.dp} | global batch {tc.global_batch_size} = micro {tc.micro_batch_size}"
            f" x DP {layout.dp} x accumulation {layout.accumulation} | {tc.global_batch_size * tc.seq_length:,}"
            f" tokens/step | {len(dataset):,} packed rows",
            flush=True,
        )

    tokens_per_step = tc.global_batch_size * tc.seq_length  # rows x tokens, padding included
    losses: list[float] = []
    target_tokens = 0.0
    t_start = t_last = time.perf_counter()
    last_logged = 0
    for step in range(tc.steps):
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
        losses.append(loss)
        target_tokens += tokens

        done_steps = step + 1
        if done_steps % tc.log_interval == 0 or done_steps in (1, tc.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            record = {
                "step": done_steps,
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step * (done_steps - last_logged) / (now - t_last),
                "target_tokens": int(tokens),
                "elapsed_s": now - t_start,
            }
            t_last, last_logged = now, done_steps
            if rank == 0:
                print(
                    f"step {done_steps:5d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f}"
                    f" | {record['tokens_per_s']:,.0f} tok/s",
                    flush=True,
                )
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    wall_s = time.perf_counter() - t_start

    # Checkpoint: every rank writes its shards into one fresh directory.
    ckpt_dir = out_dir / "checkpoint"
    if rank == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    dist.barrier()
    save_checkpoint(model[0].module, ckpt_dir)
    dist.barrier()

    stats = {
        "steps": tc.steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "tokens": tokens_per_step * tc.steps,
        "target_tokens": int(target_tokens),
        "consumed_samples": tc.global_batch_size * tc.steps,
        "wall_s": wall_s,
        "tokens_per_s": tokens_per_step * tc.steps / wall_s,
        "params": param_count(cfg),
        "world_size": layout.world,
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "data_parallel_size": layout.dp,
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


def run(spec: dict[str, Any], data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train per ``spec`` on packed rows in ``data_dir``; write outputs to ``out_dir``; return stats.

    Tears down the process groups it created (a caller's existing group is left alone).
    """
    owns_group = not dist.is_initialized()
    try:
        _, stats = train(spec, data_dir, out_dir)
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
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    run(spec, args.data, args.out)
    return 0


# dist_checkpointing's spawn-mode writer re-imports __main__: keep the entry point guarded.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
