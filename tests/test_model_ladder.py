"""The FLAN scale ladder (config/models/lamda_pt_*.yaml) loads and has the sizes the paper names."""

from __future__ import annotations

from pathlib import Path

import pytest

from flanpipe.core.model_config import load_model_config, param_count

MODELS = Path(__file__).resolve().parents[1] / "config" / "models"

# name -> nominal size in the FLAN paper (422M, 2B, 8B, 68B, 137B)
LADDER = {
    "lamda_pt_422m": 422e6,
    "lamda_pt_2b": 2e9,
    "lamda_pt_8b": 8e9,
    "lamda_pt_68b": 68e9,
    "lamda_pt_137b": 137e9,
}


@pytest.mark.parametrize("name", list(LADDER))
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
    assert cfg.num_attention_heads * cfg.kv_channels == 16384  # 128 heads of 128 (2 x d_model)
    # Per layer, d = 16384: qkv 8192 * 3d + 3d = 402,702,336; proj d * 8192 + 8192 = 134,225,920;
    # fc1 (gated) 8192 * 65536 * 2 + 2 * 65536 = 1,073,872,896; fc2 65536 * 8192 + 8192 = 536,879,104;
    # 2 RMSNorm gains 16,384 -> 2,147,696,640 per layer; x 64 = 137,452,584,960;
    # + embeddings 2 x 32000 x 8192 = 524,288,000 + final norm 8192.
    assert param_count(cfg) == 64 * 2_147_696_640 + 524_288_000 + 8192 == 137_976_881_152


def test_all_model_configs_load() -> None:
    """Every file in config/models is a valid ModelConfig (catches typos in hand-edited YAML)."""
    paths = sorted(MODELS.glob("*.yaml"))
    assert {p.stem for p in paths} >= set(LADDER)
    for p in paths:
        assert param_count(load_model_config(p)) > 0


def test_fusions_follow_the_kernels_that_exist() -> None:
    """The GPU path turns on a Megatron fusion only where its kernel is installed; the decisions are
    checked here (this machine has no GPU to run them). CPU: none of Megatron's kernels; a gated SiLU
    takes the bias+SwiGLU path, which megatron_compat computes eagerly."""
    from flanpipe.core.model_config import ModelConfig
    from flanpipe.model.gpt import fusion_flags

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=64,
                max_position_embeddings=32, position_embedding_type="rope", gated_linear_unit=True,
                activation="gelu", normalization="LayerNorm", init_method_std=0.02)  # fmt: skip
    lamda_like = ModelConfig(**base)
    cpu = fusion_flags(lamda_like, on_gpu=False, te=True, apex=frozenset({"scaled_masked_softmax_cuda"}))
    assert cpu["use_cpu_initialization"] and not any(v for k, v in cpu.items() if k != "use_cpu_initialization")
    swiglu = ModelConfig(**{**base, "activation": "silu"})
    cpu_swiglu = fusion_flags(swiglu, on_gpu=False, te=False, apex=frozenset())
    assert {k for k, v in cpu_swiglu.items() if v} == {"use_cpu_initialization", "bias_activation_fusion"}

    plain = fusion_flags(lamda_like, on_gpu=True, te=False, apex=frozenset())
    assert plain == {
        "bias_activation_fusion": True,  # Megatron's torch.jit GeGLU: no extension needed
        "bias_dropout_fusion": True,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        "cross_entropy_loss_fusion": False,
    }
    te = fusion_flags(lamda_like, on_gpu=True, te=True, apex=frozenset())
    assert te["apply_rope_fusion"] and te["gradient_accumulation_fusion"] and not te["masked_softmax_fusion"]
    apex = fusion_flags(
        lamda_like,
        on_gpu=True,
        te=False,
        apex=frozenset({"scaled_masked_softmax_cuda", "fused_weight_gradient_mlp_cuda", "fast_layer_norm"}),
    )
    assert apex["masked_softmax_fusion"] and apex["gradient_accumulation_fusion"] and apex["persist_layer_norm"]
    assert not apex["apply_rope_fusion"]  # Megatron's fused RoPE is Transformer Engine's
    # forms Megatron's jit kernels do not cover stay unfused: relu, ungated silu; RMSNorm is not apex's
    assert not fusion_flags(ModelConfig(**{**base, "activation": "relu"}), on_gpu=True, te=False, apex=frozenset())[
        "bias_activation_fusion"
    ]
    ungated_silu = ModelConfig(**{**base, "activation": "silu", "gated_linear_unit": False})
    assert not fusion_flags(ungated_silu, on_gpu=True, te=False, apex=frozenset())["bias_activation_fusion"]
    rms = ModelConfig(**{**base, "normalization": "RMSNorm"})
    assert not fusion_flags(rms, on_gpu=True, te=False, apex=frozenset({"fast_layer_norm"}))["persist_layer_norm"]


def test_apex_probe_looks_for_nvidia_extensions_not_the_pypi_package() -> None:
    from flanpipe.model.gpt import APEX_EXTENSIONS, apex_extensions

    assert apex_extensions() <= frozenset(APEX_EXTENSIONS)
    assert "apex" not in APEX_EXTENSIONS
    assert apex_extensions() == frozenset()  # this CPU machine has none of them


def test_gpu_shaped_transformer_config_builds() -> None:
    """transformer_config for a GPU run (bf16, fusions from the kernels present) is a valid Megatron config."""
    from flanpipe.core.model_config import ModelConfig
    from flanpipe.model.gpt import transformer_config

    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=64,
                      max_position_embeddings=32, position_embedding_type="rope", gated_linear_unit=True,
                      activation="gelu", normalization="LayerNorm", init_method_std=0.02)  # fmt: skip
    tc = transformer_config(cfg, 2, 2, on_gpu=True, vpp=2, bf16=True, te=False)
    assert tc.bf16 and tc.params_dtype == tc.pipeline_dtype
    assert tc.bias_activation_fusion and tc.bias_dropout_fusion and not tc.use_cpu_initialization
    assert tc.virtual_pipeline_model_parallel_size == 2
