"""The layout an evaluation loads a model at (TP x PP, DP from the world) and the checks on it.

Torch-free: the plan checks a layout while planning, the evaluation job again on its real world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flanpipe.core.model_config import ModelConfig


def check_eval_layout(cfg: ModelConfig, tp: int, pp: int, world: int, examples: int | None = None) -> int:
    """Data-parallel size of an evaluation on ``world`` ranks at TP x PP, or a ValueError saying why not:
    the layout must divide the model (heads, layers) and the world, and every DP rank needs an example."""
    try:
        cfg.check_parallel(tp, pp, 1)
    except ValueError as e:
        raise ValueError(f"evaluation layout TP={tp} x PP={pp} (eval.layout, else train's): {e}") from None
    if world < 1 or world % (tp * pp):
        raise ValueError(f"evaluation on {world} ranks: not a multiple of TP x PP = {tp} x {pp}; world = TP x PP x DP")
    dp = world // (tp * pp)
    if examples is not None and dp > examples:
        raise ValueError(f"evaluation DP = {world} / ({tp} x {pp}) = {dp} ranks > {examples} examples per dataset")
    return dp


def eval_layout(config: Mapping[str, Any]) -> tuple[int, int]:
    """(TP, PP) evaluation loads models at: ``eval.layout``, else the training layout."""
    layout = config["eval"].get("layout") or config["train"]
    return layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
