"""The train bench's peer: the same tiny Llama-shaped model trained by ``transformers`` and by flanpipe.

    flanpipe bench train --peer [--iters 30] [--threads N] [--same-heap]

Both sides run whole optimizer steps on the same tokens: zero grads, forward + backward over the
micro-batches (one here: the micro-batch rule gives 8 rows x 1 pass for a global batch of 8 on one
rank), clip the global grad norm to 1.0, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay).

- peer: ``transformers.LlamaForCausalLM`` (what an HF user picks, default attention implementation)
  in a plain loop with ``torch.optim.AdamW`` (its default implementation).
- flanpipe: Megatron-Core GPTModel in Megatron's DDP, flanpipe.train.optim's optimizer and
  flanpipe.train.loop's forward step through Megatron's ``forward_backward`` schedule, as rule train runs it.

Shape: Llama's block exactly: RMSNorm, SwiGLU (gated SiLU), rope, no biases, untied embeddings, equal
widths, multi-head attention (no GQA: kv heads = heads), so both sides have the same parameters. The
input rows are one causal document each (so flanpipe.train.loop.forward_step passes no dense mask, as
HF passes none: both run torch's causal attention), and HF shifts labels inside, so it scores s - 1
tokens per row where Megatron scores s.

Measured so that load from other work cannot decide it: each side lives in its own process (set up as
its user runs it: flanpipe's as rule train sets up a training process, see flanpipe.core.heap; the
peer's as a plain script), and the parent makes them step in turn, one at a time, A B then B A, so
each round's two steps see the same machine. The figures: median step of each side, the median of
the per-round ratios (the pairing cancels slow drifts in load), CPU seconds per step, minor page
faults per step, and the 1-minute load average at the start, during (mean, max over rounds) and at
the end. ``--same-heap`` gives the peer's process flanpipe's allocator settings too, which isolates
what the model and step code are worth from what the process setting is worth.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from flanpipe.bench.train import timing_stats
from flanpipe.core.model_config import ModelConfig

# 4 layers, hidden 256, SwiGLU ffn 704 (~8/3 x 256, rounded to 64), vocab 4096:
# per layer 4 x 256^2 (attention) + 3 x 256 x 704 (gate, up, down) = 262k + 541k = 803k -> 3.21M,
# + untied embeddings 2 x 4096 x 256 = 2.10M -> ~5.3M parameters (+ biases and norms).
LLAMA_BENCH = ModelConfig(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    ffn_hidden_size=704,
    vocab_size=4096,
    max_position_embeddings=256,
    position_embedding_type="rope",
    gated_linear_unit=True,
    activation="silu",
    normalization="RMSNorm",
    add_bias_linear=False,
)

PEER_PACKAGES = ("transformers",)
BETAS, EPS, CLIP = (0.9, 0.95), 1e-8, 1.0


def missing_peer_packages() -> list[str]:
    """The peer's packages that are not installed (``pip install 'flanpipe[bench]'`` brings them)."""
    return [p for p in PEER_PACKAGES if importlib.util.find_spec(p) is None]


def llama_shaped(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with Llama's block: RMSNorm, SwiGLU, rope, no biases (widths kept)."""
    return dataclasses.replace(
        cfg,
        position_embedding_type="rope",
        gated_linear_unit=True,
        activation="silu",
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=False,
    )


def hf_llama(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """LlamaForCausalLM with ``cfg``'s widths, built from a config object (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,  # Megatron's layernorm_epsilon
        initializer_range=cfg.init_method_std,
        tie_word_embeddings=False,
        attention_bias=False,  # Llama: no biases, as flanpipe's add_bias_linear=False
        mlp_bias=False,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def hf_step(model: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches: list[torch.Tensor]) -> float:
    """One optimizer step of the plain loop an HF user writes (mean loss over micro-batches)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for tokens in micro_batches:
        loss = model(input_ids=tokens, labels=tokens).loss / len(micro_batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return total


def flanpipe_trainer(cfg: ModelConfig, seq_length: int, micro: int, accumulation: int, seed: int):
    """flanpipe.train.loop's model, optimizer and schedule in this process (a 1-rank gloo group).

    Returns ``step(micro_batches) -> loss``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flanpipe.core.train_config import TrainConfig
    from flanpipe.model import megatron_compat
    from flanpipe.train.loop import build_model, forward_step, init_distributed
    from flanpipe.train.optim import build_optimizer
    from flanpipe.train.rows import training_batch

    megatron_compat.quiet_warnings()
    tc = TrainConfig(
        steps=1,
        lr=1e-3,
        micro_batch_size=micro,
        global_batch_size=micro * accumulation,
        seq_length=seq_length,
        seed=seed,
        optimizer="adam",
        clip_grad=CLIP,
    )
    init_distributed(1, 1)
    chunks = build_model(cfg, tc, load_init=False)
    opt = build_optimizer(chunks, lr=tc.lr, clip_grad=CLIP, optimizer="adam")
    fwd_bwd = get_forward_backward_func()

    def step(micro_batches: list[torch.Tensor]) -> float:
        batches = [training_batch(t, torch.ones_like(t), torch.ones_like(t)) for t in micro_batches]
        for chunk in chunks:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        store = fwd_bwd(
            forward_step_func=partial(forward_step, uses_te=False),
            data_iterator=iter(batches),
            model=chunks,
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro,
            forward_only=False,
        )
        opt.step()
        s = sum(x["lm loss"] for x in store)
        return float(s[0] / s[1])

    step.params = sum(p.numel() for chunk in chunks for p in chunk.parameters())  # type: ignore[attr-defined]
    return step


SIDES = ("flanpipe", "hf_llama")


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One optimizer step as its own process measured it."""

    wall_s: float
    cpu_s: float
    """CPU seconds of the process (all its threads), user + system."""
    sys_s: float
    minor_faults: int
    loss: float


def _side_step(side: str, cfg: ModelConfig, micro_batches: list[torch.Tensor], seed: int) -> Callable[[], float]:
    """Build ``side`` in this process: its optimizer step over ``micro_batches`` (``.params``: its parameter count)."""
    if side == "flanpipe":
        micro, seq_length = micro_batches[0].shape
        step = flanpipe_trainer(cfg, seq_length, micro, len(micro_batches), seed)
        return _with_params(partial(step, micro_batches), step.params)
    model = hf_llama(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.0)
    return _with_params(partial(hf_step, model, opt, micro_batches), sum(p.numel() for p in model.parameters()))


def _with_params(step: partial, params: int) -> partial:
    step.params = params  # type: ignore[attr-defined]
    return step


def _timed(step: Callable[[], float]) -> StepTiming:
    import resource

    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    loss = step()
    wall, cpu, r1 = time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
    return StepTiming(wall, cpu, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt, loss)


def _worker(side: str, cfg: ModelConfig, tokens: torch.Tensor, micro: int, seed: int, threads: int, same_heap: bool,
            conn: Any) -> None:  # fmt: skip
    """One side's process: build it, report its first step's loss, then one timed step per request."""
    import traceback

    from flanpipe.core import heap
    from flanpipe.model import megatron_compat

    try:
        megatron_compat.quiet_warnings()
        torch.set_num_threads(threads)
        if side == "hf_llama" and same_heap:
            heap.keep_freed_memory()  # what flanpipe.train.loop.init_distributed does for a training process
        step = _side_step(side, cfg, list(tokens.split(micro)), seed)
        conn.send(("ready", {"loss": step(), "params": step.params}))
        while conn.recv() is not None:
            conn.send(("step", _timed(step)))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _receive(conn: Any, side: str) -> Any:
    kind, value = conn.recv()
    if kind == "error":
        raise RuntimeError(f"bench train --peer: the {side} side failed:\n{value}")
    return value


def time_interleaved_processes(
    cfg: ModelConfig, tokens: torch.Tensor, micro: int, seed: int, *, iters: int, warmup: int, threads: int,
    same_heap: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, list[StepTiming]], list[float]]:  # fmt: skip
    """Each side in its own process, stepping in turn (A B, B A, ...): each side's first-step loss and
    parameter count, ``iters`` timed steps per side after ``warmup`` untimed ones, and the 1-minute load
    average after each round."""
    import multiprocessing as mp
    import os

    ctx = mp.get_context("spawn")  # fresh interpreters: nothing of this process (threads, heap) is inherited
    pipes, procs = {}, []
    try:
        for side in SIDES:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(side, cfg, tokens, micro, seed, threads, same_heap, child))
            proc.start()
            child.close()
            pipes[side] = parent
            procs.append(proc)
        first = {side: _receive(pipes[side], side) for side in SIDES}
        times: dict[str, list[StepTiming]] = {side: [] for side in SIDES}
        loads = []
        for r in range(warmup + iters):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                pipes[side].send("step")
                timing = _receive(pipes[side], side)
                if r >= warmup:
                    times[side].append(timing)
            if r >= warmup:
                loads.append(os.getloadavg()[0])
    finally:
        for conn in pipes.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return first, times, loads


def bench_train_peer(
    cfg: ModelConfig = LLAMA_BENCH,
    *,
    batch_size: int = 8,
    seq_length: int = 256,
    iters: int = 30,
    warmup: int = 3,
    max_micro_batch: int = 8,
    seed: int = 1234,
    threads: int | None = None,
    same_heap: bool = False,
) -> dict[str, Any]:
    """Whole training steps/s of flanpipe's Megatron path and of HF's LlamaForCausalLM, same shape,
    each in its own process, interleaved step by step (see the module docstring)."""
    import os
    import statistics

    from flanpipe.plan.config import micro_batch_for
    from flanpipe.train.planner import model_flops_per_step

    cfg = llama_shaped(cfg)
    if seq_length > cfg.max_position_embeddings:
        raise ValueError(f"seq_length={seq_length} > max_position_embeddings={cfg.max_position_embeddings}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    threads = threads or torch.get_num_threads()
    micro = micro_batch_for(batch_size, 1, max_micro_batch)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, cfg.vocab_size, (batch_size, seq_length), generator=gen)
    load_start = os.getloadavg()[0]
    first, steps, loads = time_interleaved_processes(
        cfg, tokens, micro, seed, iters=iters, warmup=warmup, threads=threads, same_heap=same_heap
    )
    tokens_per_step = batch_size * seq_length
    flops = float(model_flops_per_step(cfg, tokens_per_step, seq_length))
    timings = {}
    for side, ts in steps.items():
        timings[side] = timing_stats([t.wall_s for t in ts], tokens_per_step, flops)
        timings[side]["cpu_s_per_step_median"] = statistics.median(t.cpu_s for t in ts)
        timings[side]["sys_s_per_step_median"] = statistics.median(t.sys_s for t in ts)
        timings[side]["minor_faults_per_step_median"] = statistics.median(t.minor_faults for t in ts)
    fp, hf = timings["flanpipe"], timings["hf_llama"]
    paired = [h.wall_s / f.wall_s for f, h in zip(steps["flanpipe"], steps["hf_llama"], strict=True)]
    return {
        "model": cfg.to_dict(),
        "params_flanpipe": first["flanpipe"]["params"],
        "params_hf": first["hf_llama"]["params"],
        "hf_attention": "sdpa",
        "differences": [
            "HF shifts labels inside: s-1 scored tokens per row vs s",
            "flanpipe: Megatron local spec, attention by torch SDPA, causal (rows of one document: no dense mask)",
        ],
        "batch_size": batch_size,
        "micro_batch_size": micro,
        "accumulation": batch_size // micro,
        "seq_length": seq_length,
        "optimizer": {"name": "AdamW", "lr": 1e-3, "betas": BETAS, "eps": EPS, "clip_grad": CLIP},
        "iters": iters,
        "warmup": warmup,
        "threads": threads,
        "same_heap": same_heap,
        "torch": torch.__version__,
        "first_step_loss": {side: first[side]["loss"] for side in SIDES},
        "timings": timings,
        "ratio_flanpipe_over_hf": hf["s_per_iter_mean"] / fp["s_per_iter_mean"],
        "ratio_flanpipe_over_hf_median": hf["s_per_iter_median"] / fp["s_per_iter_median"],
        "ratio_paired_median": statistics.median(paired),
        "ratio_paired_quartiles": [float(q) for q in statistics.quantiles(paired, n=4)] if len(paired) > 1 else paired,
        "ratio_cpu_median": hf["cpu_s_per_step_median"] / fp["cpu_s_per_step_median"],
        "loadavg_1m": {
            "start": round(load_start, 2),
            "mean": round(statistics.fmean(loads), 2),
            "max": round(max(loads), 2),
            "end": round(os.getloadavg()[0], 2),
        },
    }
