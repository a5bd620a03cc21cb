"""The train bench's peer: the same tiny Llama-shaped model trained by ``transformers`` and by flanpipe.

    flanpipe bench train --peer

Both sides run whole optimizer steps on the same tokens: zero grads, forward + backward over the
micro-batches (one here: the micro-batch rule gives 8 rows x 1 pass for a global batch of 8 on one
rank), clip the global grad norm to 1.0, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay).

- peer: ``transformers.LlamaForCausalLM`` (what an HF user picks, default attention implementation)
  in a plain loop with ``torch.optim.AdamW``.
- flanpipe: Megatron-Core GPTModel in Megatron's DDP, flanpipe.train.optim's optimizer and
  flanpipe.train.loop's forward step through Megatron's ``forward_backward`` schedule, as rule train runs it.

Shape: Llama's block exactly: RMSNorm, SwiGLU (gated SiLU), rope, no biases, untied embeddings, equal
widths, multi-head attention (no GQA: kv heads = heads), so both sides have the same parameters. The
input rows are one causal document each (the dense packed-row mask Megatron takes is plain causal
then), and HF shifts labels inside, so it scores s - 1 tokens per row where Megatron scores s.
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
from flanpipe.core.model_config import ModelConfig, param_count

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

    return step


def time_steps(steps: dict[str, Callable[[], float]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each side, interleaved (A B A B ...) so machine load hits both alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_train_peer(
    cfg: ModelConfig = LLAMA_BENCH,
    *,
    batch_size: int = 8,
    seq_length: int = 256,
    iters: int = 10,
    warmup: int = 2,
    max_micro_batch: int = 8,
    seed: int = 1234,
) -> dict[str, Any]:
    """Whole training steps/s of flanpipe's Megatron path and of HF's LlamaForCausalLM, same shape."""
    from flanpipe.plan.config import micro_batch_for
    from flanpipe.train.planner import model_flops_per_step

    cfg = llama_shaped(cfg)
    if seq_length > cfg.max_position_embeddings:
        raise ValueError(f"seq_length={seq_length} > max_position_embeddings={cfg.max_position_embeddings}")
    micro = micro_batch_for(batch_size, 1, max_micro_batch)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, cfg.vocab_size, (batch_size, seq_length), generator=gen)
    micro_batches = list(tokens.split(micro))

    ours = flanpipe_trainer(cfg, seq_length, micro, len(micro_batches), seed)
    hf = hf_llama(cfg, seed)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.0)
    first = {"flanpipe": ours(micro_batches), "hf_llama": hf_step(hf, hf_opt, micro_batches)}
    times = time_steps(
        {"flanpipe": lambda: ours(micro_batches), "hf_llama": lambda: hf_step(hf, hf_opt, micro_batches)},
        iters,
        max(0, warmup - 1),
    )
    tokens_per_step = batch_size * seq_length
    flops = float(model_flops_per_step(cfg, tokens_per_step, seq_length))
    timings = {name: timing_stats(t, tokens_per_step, flops) for name, t in times.items()}
    hf_params = sum(p.numel() for p in hf.parameters())
    return {
        "model": cfg.to_dict(),
        "params_flanpipe": param_count(cfg),
        "params_hf": hf_params,
        "hf_attention": getattr(hf.config, "_attn_implementation", None),
        "differences": [
            "HF shifts labels inside: s-1 scored tokens per row vs s",
            "flanpipe: Megatron local spec, attention by torch SDPA with a dense boolean mask (what packed rows need)",
        ],
        "batch_size": batch_size,
        "micro_batch_size": micro,
        "accumulation": len(micro_batches),
        "seq_length": seq_length,
        "optimizer": {"name": "AdamW", "lr": 1e-3, "betas": BETAS, "eps": EPS, "clip_grad": CLIP},
        "iters": iters,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "first_step_loss": first,
        "timings": timings,
        "ratio_flanpipe_over_hf": timings["flanpipe"]["tokens_per_s"] / timings["hf_llama"]["tokens_per_s"],
        "ratio_flanpipe_over_hf_median": timings["flanpipe"]["tokens_per_s_median"]
        / timings["hf_llama"]["tokens_per_s_median"],
    }
