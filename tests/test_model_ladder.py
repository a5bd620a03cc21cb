"""The FLAN scale ladder (config/models/lamda_pt_*.yaml) loads and has the sizes the paper names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flanpipe.model import ModelConfig, load_model_config, param_count

MODELS = Path(__file__).resolve().parents[1] / "config" / "models"

# name -> nominal size in the FLAN paper (422M, 2B, 8B, 68B, 137B)
LADDER = {
    "lamda_pt_422m": 422e6,
    "lamda_pt_2b": 2e9,
    "lamda_pt_8b": 8e9,
    "lamda_pt_68b": 68e9,
    "lamda_pt_137b": 137e9,
}

# LaMDA's 68B/137B attention is 128 heads x 128 = 16384 wide on a d_model of 8192; ModelConfig derives
# head dim = hidden / heads, so until it has a kv_channels field those two configs are ~12% light.
HAS_KV_FIELD = "kv_channels" in {f.name for f in dataclasses.fields(ModelConfig)}
WIDE_ATTENTION = pytest.mark.xfail(
    not HAS_KV_FIELD,
    reason="ModelConfig has no kv_channels field: 128 heads of 128 not expressible (see lamda_pt_137b.yaml)",
    strict=True,
)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=WIDE_ATTENTION) if n in ("lamda_pt_68b", "lamda_pt_137b") else n for n in LADDER],
)
def test_ladder_param_count_near_nominal(name: str) -> None:
    cfg = load_model_config(MODELS / f"{name}.yaml")
    n = param_count(cfg)
    assert abs(n - LADDER[name]) / LADDER[name] < 0.10, f"{name}: {n / 1e9:.3f}B vs {LADDER[name] / 1e9:g}B"


@pytest.mark.parametrize("name", list(LADDER))
def test_ladder_configs_load_and_split_over_a_node(name: str) -> None:
    """Every rung keeps the LaMDA family traits and splits over TP=8 (one 8-GPU node)."""
    cfg = load_model_config(MODELS / f"{name}.yaml")
    assert cfg.gated_linear_unit and cfg.activation == "gelu"
    assert cfg.vocab_size == 32000 and cfg.position_embedding_type == "rope"
    assert cfg.ffn_hidden_size == 8 * cfg.hidden_size  # LaMDA-PT 137B: 65536 = 8 x 8192
    cfg.check_parallel(8, 1)


def test_137b_shape_is_lamdas() -> None:
    cfg = load_model_config(MODELS / "lamda_pt_137b.yaml")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size) == (64, 8192, 128, 65536)
    # As written today (head dim 64): per layer 4 * 8192^2 + 3 * 8192 * 65536 = 268.4M + 1610.6M = 1879.0M,
    # + biases 3h + h + 2f + h = 172,032 and 2 RMSNorm gains 2h = 16,384 -> 1,879,236,608 per layer;
    # 64 layers = 120,271,142,912; + embeddings 2 x 32000 x 8192 = 524,288,000 + final norm 8192.
    # With kv_channels = 128 (LaMDA) the attention is twice as wide and the total ~138.0B.
    if not HAS_KV_FIELD:
        assert param_count(cfg) == 64 * 1_879_236_608 + 524_288_000 + 8192 == 120_795_439_104


def test_all_model_configs_load() -> None:
    """Every file in config/models is a valid ModelConfig (catches typos in hand-edited YAML)."""
    paths = sorted(MODELS.glob("*.yaml"))
    assert {p.stem for p in paths} >= set(LADDER)
    for p in paths:
        assert param_count(load_model_config(p)) > 0
