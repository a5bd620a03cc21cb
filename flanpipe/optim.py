"""Optimizer: Adafactor (FLAN's choice) behind Megatron's FP32Optimizer wrapper.

Megatron's optimizer factory only knows Adam and SGD, so the torch optimizer is built here and
wrapped in ``FP32Optimizer``, which supplies what the training loop needs from Megatron: moving
DDP's ``main_grad`` buffers into ``.grad``, the model-parallel-aware global grad norm (each
TP/PP shard counted once) and clipping by it.

Adafactor here is ``torch.optim.Adafactor`` with its defaults (beta2 decay -0.8, eps (None, 1e-3),
update clipping d=1). Two properties matter when reading results:
- Its step is relative to parameter scale: alpha_t = max(1e-3, RMS(theta)) * min(lr, 1/sqrt(t)).
  Weights initialised at std 0.02 therefore move ~0.02 * lr per step, so the right ``lr`` is
  much larger than an Adam learning rate for the same run.
- Known deviation under tensor parallelism: the factored second-moment statistics (row and
  column means of grad^2) and the RMS terms are computed per TP shard, not over the full matrix,
  so a TP=2 update differs slightly from the TP=1 update (~3e-4 relative after one step; Adam is
  shard-invariant). PP and DP do not change the update. A shard-invariant Adafactor would
  all-reduce those statistics over the TP group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adafactor", "adam")


def lr_at(step: int, *, lr: float, warmup_steps: int = 0) -> float:
    """Constant schedule with optional linear warmup; ``step`` is 0-based.

    During warmup step t uses lr * (t + 1) / warmup_steps, so the first update is not zero and
    step warmup_steps - 1 reaches the full lr.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


def _param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm gains (1-D) are never decayed."""
    if weight_decay == 0.0:
        return [{"params": params, "weight_decay": 0.0}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model_chunks: Iterable[torch.nn.Module],
    *,
    lr: float,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    optimizer: str = "adafactor",
):
    """Wrap a torch optimizer over every trainable parameter of this rank's model chunks.

    ``clip_grad`` > 0 clips by the global grad norm (over all TP/PP ranks); 0 disables clipping.
    """
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    from flanpipe import megatron_compat

    megatron_compat.apply()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if lr <= 0 or weight_decay < 0 or clip_grad < 0:
        raise ValueError(f"need lr > 0, weight_decay >= 0, clip_grad >= 0; got {lr}, {weight_decay}, {clip_grad}")
    params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
    groups = _param_groups(params, weight_decay)
    if optimizer == "adafactor":
        inner = torch.optim.Adafactor(groups, lr=lr)
    else:
        inner = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        params_dtype=torch.float32,
    )
    return FP32Optimizer(inner, config, init_state_fn=None)


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every param group (wrapper or torch optimizer)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        group["lr"] = lr
