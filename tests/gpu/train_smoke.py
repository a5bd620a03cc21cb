"""GPU smoke checks of the training path (run by tests/gpu/smoke.sh; CI does not run it).

1. Packed attention: the same packed rows through Transformer Engine's THD path (cu_seqlens, what
   train.forward_step feeds TE) and through the local spec's dense block-diagonal mask, on the same
   weights, give equal per-token losses (within bf16 tolerance); both are also compared with each
   segment run alone (the definition both must meet), so a failure says which path is wrong.
2. ``--steps``: that many bf16 optimizer steps of a ~110M-parameter model, printing tokens/s and MFU
   (model FLOPs of flanpipe.core.model_config.flops_per_token over the planner's dense bf16 peak).
   Under torchrun with 2 GPUs, ``--tp 2`` runs the steps at TP=2.

Without CUDA it says so and exits 0, claiming nothing. ``--dry-run`` runs the same code on CPU with a
tiny fp32 model and the local spec only (the THD path needs TE on a GPU): the test suite uses it to
keep this script importable and its logic right without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

SMOKE_MODEL = dict(
    num_layers=12,
    hidden_size=768,
    num_attention_heads=12,
    ffn_hidden_size=3072,
    vocab_size=16384,
    max_position_embeddings=1024,
)  # ~110M parameters
DRY_MODEL = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64
)


def packed_rows(b: int, s: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and segment ids [b, s]: 2-4 segments of random length per row, then a pad run (seg 0)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (b, s), generator=gen)
    segments = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):  # a few rows of set-up, not a hot path
        n = int(torch.randint(2, 5, (1,), generator=gen))
        cuts = sorted(torch.randperm(s - 8, generator=gen)[: n - 1].add(4).tolist())
        bounds = [0, *cuts, s - int(torch.randint(0, 8, (1,), generator=gen))]
        for k in range(n):
            segments[r, bounds[k] : bounds[k + 1]] = k + 1
    return tokens, segments


def te_to_local_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a TE-spec GPTModel state dict to the local spec's names: TE fuses each pre-norm into the
    linear after it (linear_qkv / linear_fc1 ``layer_norm_*``); its ``_extra_state`` entries have no twin."""
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        name = name.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.")
        name = name.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
        out[name] = value
    return out


def _token_losses_mask(model: torch.nn.Module, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] of packed rows through the dense block-diagonal mask (local spec)."""
    from flanpipe.train.rows import training_batch

    batch = {k: v.to(tokens.device) for k, v in training_batch(tokens, segments, segments != 0).items()}
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return out.float() * batch["loss_mask"]


def _token_losses_thd(model: torch.nn.Module, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] of the same rows as one THD sequence (train.forward_step's TE path)."""
    from flanpipe.train.rows import packed_seq_params, training_batch

    batch = {k: v.to(tokens.device) for k, v in training_batch(tokens, segments, segments != 0).items()}
    params = packed_seq_params(segments.to(tokens.device))
    flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "position_ids")}
    out = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"], packed_seq_params=params)
    return out.float().reshape(tokens.shape) * batch["loss_mask"]


def _token_losses_alone(model: torch.nn.Module, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] with every segment run as its own unpacked sequence: the reference."""
    from flanpipe.train.rows import training_batch

    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for r in range(tokens.shape[0]):  # one forward per segment: the reference is allowed to be slow
        for seg in segments[r].unique().tolist():
            if seg == 0:
                continue
            cols = (segments[r] == seg).nonzero().flatten()
            a, z = int(cols[0]), int(cols[-1]) + 1
            one = torch.ones(1, z - a, dtype=torch.long)
            batch = {k: v.to(tokens.device) for k, v in training_batch(tokens[r : r + 1, a:z].cpu(), one, one).items()}
            loss = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            out[r, a:z] = (loss.float() * batch["loss_mask"])[0]
    return out


def check_packed_attention(cfg, *, device: str, use_te: bool, bf16: bool, tol: float) -> bool:
    """Print and return whether THD (if ``use_te``) and the block-diagonal mask agree with each other and
    with each segment run alone, per token within ``tol`` (bf16: weights and activations in Megatron's
    Float16Module, as training runs them)."""
    from megatron.core.transformer.module import Float16Module

    from flanpipe.model.gpt import model_provider

    def build(te: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        return model_provider(cfg, use_te=te, bf16=bf16).to(device).eval()

    local = build(False)
    if use_te:
        te = build(True)
        missing, unexpected = local.load_state_dict(te_to_local_state(te.state_dict()), strict=False)
        if missing or unexpected:
            print(
                f"train_smoke: TE -> local weight names do not map: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
            return False
    wrap = (lambda m: Float16Module(m.config, m)) if bf16 else (lambda m: m)
    tokens, segments = packed_rows(4, min(256, cfg.max_position_embeddings), cfg.vocab_size, seed=1)
    tokens = tokens.to(device)
    with torch.no_grad():
        results = {
            "mask": _token_losses_mask(wrap(local), tokens, segments),
            "alone": _token_losses_alone(wrap(local), tokens, segments),
        }
        if use_te:
            results["thd"] = _token_losses_thd(wrap(te), tokens, segments)
    ok = True
    n = int((results["mask"] != 0).sum())
    for a, b in (("mask", "alone"), ("thd", "mask"), ("thd", "alone")):
        if a in results and b in results:
            diff = float((results[a] - results[b]).abs().max())
            mean_a = float(results[a].sum() / n)
            mean_b = float(results[b].sum() / n)
            good = diff <= tol
            ok &= good
            print(
                f"train_smoke: packed attention {a} vs {b}: mean loss {mean_a:.5f} vs {mean_b:.5f}, "
                f"max |token diff| {diff:.2e} (tol {tol:g}) {'OK' if good else 'DIFFER'}"
            )
    return ok


def train_steps(cfg, *, steps: int, batch: int, seq: int, tp: int, device: str, bf16: bool, use_te: bool) -> dict:
    """``steps`` AdamW steps on random packed rows (the THD path with TE, else the mask); tokens/s and MFU
    over the steps after the first two (warm-up: kernel selection, allocator)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from flanpipe.core.model_config import flops_per_token, param_count
    from flanpipe.model.gpt import model_provider
    from flanpipe.train.planner import Hardware

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = model_provider(cfg, tp=tp, use_te=use_te, bf16=bf16).to(device)
    net = Float16Module(model.config, model) if bf16 else model
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    tokens, segments = packed_rows(batch, seq, cfg.vocab_size, seed=2)
    tokens = tokens.to(device)
    losses = _token_losses_thd if use_te else _token_losses_mask
    n_tok = (segments != 0).sum().item()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warm = min(2, steps - 1)
    for i in range(steps):
        if i == warm:
            sync()
            t0 = time.perf_counter()
        loss = losses(net, tokens, segments).sum() / n_tok
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    wall = time.perf_counter() - t0
    tok_s = batch * seq * (steps - warm) / wall
    peak = Hardware(gpus=tp).peak_tflops * 1e12 * tp
    return {
        "params": param_count(cfg),
        "tp": tp,
        "steps": steps,
        "tokens_per_s": tok_s,
        "loss": loss.item(),
        "mfu": flops_per_token(cfg, seq) * tok_s / peak,
        "finite": bool(torch.isfinite(loss)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny fp32 model, local spec: checks the script")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tp", type=int, default=1, help="under torchrun: tensor-parallel size of the training steps")
    p.add_argument("--skip-attention", action="store_true", help="only the training steps (the TP=2 run)")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("train_smoke: no CUDA device: nothing checked")
        return 0
    from flanpipe.core.model_config import ModelConfig
    from flanpipe.model.gpt import te_available
    from flanpipe.train.loop import init_distributed

    init_distributed(a.tp, 1)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    device = "cpu" if a.dry_run else "cuda"
    cfg = ModelConfig(**(DRY_MODEL if a.dry_run else SMOKE_MODEL))
    te = not a.dry_run and te_available()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    ok = True
    if not a.skip_attention:
        if not te and not a.dry_run:
            print("train_smoke: Transformer Engine not importable: THD path NOT checked (mask vs alone only)")
        # fp32 first (tight: only kernel order differs), then bf16 (rounding differs between fused kernels)
        ok &= check_packed_attention(cfg, device=device, use_te=te, bf16=False, tol=2e-3 if te else 1e-4)
        if te or a.dry_run:
            ok &= check_packed_attention(cfg, device=device, use_te=te, bf16=True, tol=0.1)
    r = train_steps(
        cfg,
        steps=a.steps,
        batch=2 if a.dry_run else 8,
        seq=64 if a.dry_run else 1024,
        tp=a.tp,
        device=device,
        bf16=not a.dry_run,
        use_te=te,
    )
    ok &= r["finite"]
    if rank0:
        print(
            f"train_smoke: {r['steps']} {'fp32 CPU' if a.dry_run else 'bf16'} steps, {r['params'] / 1e6:.1f}M params, "
            f"TP={r['tp']}, {'THD' if te else 'mask'}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%} "
            f"(of {'CPU: meaningless' if a.dry_run else 'H100 dense bf16 peak'}), last loss {r['loss']:.3f}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
