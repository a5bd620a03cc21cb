"""What Megatron-Core costs on this machine: GPTModel vs the same math in plain PyTorch.

    flanpipe bench train --json

Both models get the same weights (Megatron's are copied into the plain one), the same tokens and
the same causal mask; one forward+backward per iteration, warmup iterations excluded. The plain
model exists only to measure against: it reproduces Megatron's local layer spec op for op
(pre-norm, fused QKV laid out per head, rope, -10000 masked fill, fp32 softmax, untied output),
so equal losses show the comparison is like for like. A third timing swaps the attention core for
``scaled_dot_product_attention`` to show what a fused kernel buys.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flanpipe.core.model_config import ModelConfig, param_count

# 4 layers, hidden 256: 4 x (12 x 256^2 + biases/norms) = 3.15M + untied embeddings 2 x 4096 x 256 = 2.10M
# -> 5.25M parameters; batch 8 x 256 tokens = 2,048 tokens per iteration.
BENCH_MODEL = ModelConfig(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    ffn_hidden_size=1024,
    vocab_size=4096,
    max_position_embeddings=256,
)

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def _norm(cfg: ModelConfig) -> nn.Module:
    # Megatron's local spec: torch LayerNorm / RMSNorm with its default layernorm_epsilon 1e-5.
    if cfg.normalization == "LayerNorm":
        return nn.LayerNorm(cfg.hidden_size, eps=1e-5)
    return nn.RMSNorm(cfg.hidden_size, eps=1e-5)


def rope_cos_sin(seq_length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables [s, head_dim] as Megatron builds them (non-interleaved: halves, not pairs).

    inv_freq_i = base^(-2i / head_dim), angle[p, i] = p * inv_freq_i, duplicated over both halves.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]; x is [b, heads, s, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    """One pre-norm transformer layer with the parameter names of Megatron's local spec."""

    def __init__(self, cfg: ModelConfig, sdpa: bool):
        super().__init__()
        self.cfg, self.sdpa = cfg, sdpa
        d = cfg.num_attention_heads * cfg.kv_channels
        glu = 2 if cfg.gated_linear_unit else 1
        self.input_layernorm = _norm(cfg)
        self.linear_qkv = nn.Linear(cfg.hidden_size, 3 * d)
        self.linear_proj = nn.Linear(d, cfg.hidden_size)
        self.pre_mlp_layernorm = _norm(cfg)
        self.linear_fc1 = nn.Linear(cfg.hidden_size, glu * cfg.ffn_hidden_size)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def attention(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        b, s, _ = x.shape
        nh, hd = self.cfg.num_attention_heads, self.cfg.kv_channels
        # Megatron lays the fused QKV output out per head: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...].
        q, k, v = self.linear_qkv(x).view(b, s, nh, 3, hd).permute(3, 0, 2, 1, 4).unbind(0)  # 3 x [b, nh, s, hd]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            probs = torch.softmax(scores.masked_fill(mask, -10000.0).float(), dim=-1).to(v.dtype)
            y = probs @ v
        return self.linear_proj(y.transpose(1, 2).reshape(b, s, nh * hd))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.cfg.activation]
        h = self.linear_fc1(x)
        if self.cfg.gated_linear_unit:
            a, g = h.chunk(2, dim=-1)  # Megatron: act(first half) * second half
            h = act(a) * g
        else:
            h = act(h)
        return self.linear_fc2(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        x = x + self.attention(self.input_layernorm(x), mask, rope)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class PlainGPT(nn.Module):
    """Decoder-only LM in plain PyTorch, [b, s] layout, returning per-token cross entropy [b, s]."""

    def __init__(self, cfg: ModelConfig, sdpa: bool = False):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, sdpa) for _ in range(cfg.num_layers))
        self.final_layernorm = _norm(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        x = self.word_embeddings(tokens)
        rope = None
        if self.cfg.position_embedding_type == "rope":
            cos, sin = rope_cos_sin(s, self.cfg.kv_channels)
            rope = (cos.to(x), sin.to(x))
        else:
            x = x + self.position_embeddings(torch.arange(s, device=tokens.device))
        for layer in self.layers:
            x = layer(x, mask, rope)
        logits = self.output_layer(self.final_layernorm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


# Megatron state-dict name -> PlainGPT name (``_extra_state`` entries carry no weights).
_RENAMES = [
    (r"^embedding\.word_embeddings\.", "word_embeddings."),
    (r"^embedding\.position_embeddings\.", "position_embeddings."),
    (r"^decoder\.layers\.(\d+)\.self_attention\.", r"layers.\1."),
    (r"^decoder\.layers\.(\d+)\.mlp\.", r"layers.\1."),
    (r"^decoder\.layers\.(\d+)\.", r"layers.\1."),
    (r"^decoder\.final_layernorm\.", "final_layernorm."),
]


def megatron_to_plain_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a TP=1 GPTModel state dict to PlainGPT's names (first matching rule wins)."""
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, name):
                name = re.sub(pattern, repl, name)
                break
        out[name] = value
    return out


def causal_mask(seq_length: int) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (Megatron's convention): token i sees j <= i."""
    return torch.ones(seq_length, seq_length, dtype=torch.bool).triu(1)[None, None]


def time_interleaved(
    steps: dict[str, Callable[[], torch.Tensor]], iters: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of each timed call of each step, after ``warmup`` untimed calls of each.

    Rounds interleave the models (A B C A B C ...) so that load from other processes on a shared
    machine slows all of them alike instead of whichever happened to run during it.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def fwd_bwd_step(model: nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One iteration: clear grads, forward to per-token loss, mean, backward."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = forward().mean()
        loss.backward()
        return loss.detach()

    return step


def timing_stats(times: list[float], tokens_per_iter: int, flops_per_iter: float) -> dict[str, float]:
    """tokens/s over the total timed span (not the mean of per-iteration rates), and at the median
    iteration, which a busy shared machine disturbs less than the total."""
    total, median = sum(times), statistics.median(times)
    return {
        "tokens_per_s": tokens_per_iter * len(times) / total,
        "tokens_per_s_median": tokens_per_iter / median,
        "s_per_iter_mean": total / len(times),
        "s_per_iter_median": median,
        "gflops_per_s": flops_per_iter * len(times) / total / 1e9,
    }


def build_megatron(cfg: ModelConfig, seed: int) -> nn.Module:
    """TP=1/PP=1 GPTModel (local spec) in a 1-process gloo group, seeded like flanpipe.train.loop."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from flanpipe.model import megatron_compat
    from flanpipe.model.gpt import init_single_process, model_provider

    megatron_compat.quiet_warnings()
    init_single_process()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return model_provider(cfg, pre_process=True, post_process=True, use_te=False)


def bench_train(
    cfg: ModelConfig = BENCH_MODEL,
    *,
    batch_size: int = 8,
    seq_length: int = 256,
    iters: int = 20,
    warmup: int = 3,
    seed: int = 1234,
) -> dict[str, Any]:
    """Time fwd+bwd of Megatron's GPTModel and of PlainGPT (eager and SDPA) on identical weights."""
    from flanpipe.train.planner import model_flops_per_step

    if seq_length > cfg.max_position_embeddings:
        raise ValueError(f"seq_length={seq_length} > max_position_embeddings={cfg.max_position_embeddings}")
    if iters < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("need iters >= 1, warmup >= 0, batch_size >= 1")
    megatron = build_megatron(cfg, seed)
    device = next(megatron.parameters()).device
    plain = PlainGPT(cfg).to(device)
    plain.load_state_dict(megatron_to_plain_state(megatron.state_dict()), strict=True)
    fused = PlainGPT(cfg, sdpa=True).to(device)
    fused.load_state_dict(plain.state_dict())

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, cfg.vocab_size, (batch_size, seq_length + 1), generator=gen).to(device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(seq_length, device=device).expand(batch_size, seq_length)
    mask = causal_mask(seq_length).to(device)

    forwards = {
        "megatron": (megatron, lambda: megatron(inputs, positions, mask, labels=labels)),
        "plain": (plain, lambda: plain(inputs, labels, mask)),
        "plain_sdpa": (fused, lambda: fused(inputs, labels, mask)),
    }
    with torch.no_grad():
        losses = {name: fwd().float() for name, (_, fwd) in forwards.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    tokens_per_iter = batch_size * seq_length
    flops = float(model_flops_per_step(cfg, tokens_per_iter, seq_length))
    steps = {name: fwd_bwd_step(model, fwd) for name, (model, fwd) in forwards.items()}
    times = time_interleaved(steps, iters, warmup, sync)
    timings = {name: timing_stats(t, tokens_per_iter, flops) for name, t in times.items()}
    ref = losses["megatron"]
    return {
        "model": cfg.to_dict(),
        "params": param_count(cfg),
        "batch_size": batch_size,
        "seq_length": seq_length,
        "tokens_per_iter": tokens_per_iter,
        "model_flops_per_iter": flops,
        "iters": iters,
        "warmup": warmup,
        "dtype": "float32",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timings": timings,
        "ratio_plain_over_megatron": timings["plain"]["tokens_per_s"] / timings["megatron"]["tokens_per_s"],
        "ratio_plain_sdpa_over_megatron": timings["plain_sdpa"]["tokens_per_s"] / timings["megatron"]["tokens_per_s"],
        "ratio_plain_over_megatron_median": timings["plain"]["tokens_per_s_median"]
        / timings["megatron"]["tokens_per_s_median"],
        "weights_copied": True,
        "loss": {name: loss.mean().item() for name, loss in losses.items()},
        "loss_max_abs_diff_vs_megatron": {
            name: (loss - ref).abs().max().item() for name, loss in losses.items() if name != "megatron"
        },
    }


def bench_model_from(path: str | None, overrides: dict[str, int], base: ModelConfig = BENCH_MODEL) -> ModelConfig:
    """The bench model: ``base`` or a config file, with CLI shape overrides applied.

    ``ModelConfig`` fills kv_channels (hidden / heads) and num_query_groups (= heads) from the shape;
    when the overrides change that shape, those derived values are derived again (a grouped-query
    config keeps its group count).
    """
    from flanpipe.model.hf_format import load_model_file

    cfg = load_model_file(path) if path else base
    changes: dict[str, object] = {k: v for k, v in overrides.items() if v is not None}
    if "hidden_size" in changes or "num_attention_heads" in changes:
        if cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size:
            changes.setdefault("kv_channels", None)
        if cfg.num_query_groups == cfg.num_attention_heads:
            changes.setdefault("num_query_groups", None)
    return dataclasses.replace(cfg, **changes)
