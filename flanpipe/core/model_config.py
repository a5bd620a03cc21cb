"""The decoder-only LM's shape: ``ModelConfig`` and the arithmetic on it, in plain Python.

Planning (``snakemake -n``), config checks and the layout planner read model shapes without importing
torch or Megatron; ``flanpipe.model.gpt`` turns a ``ModelConfig`` into a Megatron-Core GPTModel.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flanpipe.core.io import read_yaml

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
_POSITION_TYPES = ("rope", "learned_absolute")
_NORMALIZATIONS = ("LayerNorm", "RMSNorm")


# What Megatron's dist_checkpointing.save writes last into a model dir's checkpoint/
# (flanpipe.model.checkpointing._complete): without them a load fails only inside the job that loads it.
CHECKPOINT_FILES = ("metadata.json", "common.pt")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer (config/models/{name}.yaml)."""

    num_layers: int
    """Transformer layers; split evenly across pipeline stages."""

    hidden_size: int
    """Width of the residual stream."""

    num_attention_heads: int
    """Attention heads; head dim = hidden_size / num_attention_heads."""

    ffn_hidden_size: int
    """Inner width of the MLP (per branch when gated_linear_unit)."""

    vocab_size: int
    """Embedding rows; must be >= the tokenizer's vocabulary size."""

    max_position_embeddings: int
    """Longest sequence the model accepts (the size of the learned position table)."""

    position_embedding_type: str = "rope"
    """'rope' (rotary, no parameters) or 'learned_absolute'."""

    gated_linear_unit: bool = False
    """GLU-style MLP (e.g. SwiGLU with activation 'silu'): fc1 produces two branches."""

    activation: str = "gelu"
    """MLP nonlinearity: gelu (exact erf form), gelu_tanh (GPT-2's tanh approximation), relu or silu."""

    normalization: str = "LayerNorm"
    """Pre-norm type: LayerNorm or RMSNorm."""

    init_method_std: float = 0.02
    """Std of the normal init of weight matrices (output layers scaled by 1/sqrt(2*layers))."""

    kv_channels: int | None = None
    """Per-head width; default hidden_size / num_attention_heads. LaMDA-PT 137B uses 128 heads of 128
    on d_model 8192, i.e. attention 16,384 wide: set it explicitly for such models."""

    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); default num_attention_heads (multi-head attention)."""

    add_bias_linear: bool = True
    """Biases on every linear layer (QKV, attention output, both MLP layers): GPT-2 has them, Llama not."""

    add_qkv_bias: bool = False
    """Bias on the QKV projection even when add_bias_linear is off (Qwen2)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding (GPT-2, small Qwen2 and Llama 3.2)."""

    rotary_base: int = 10000
    """RoPE theta (Llama 2: 10000, Llama 3: 500000, Qwen2: 1000000)."""

    rope_scaling_factor: float | None = None
    """Llama 3.1 RoPE frequency scaling (Megatron's rope_scaling: low/high frequency factors 1 and 4,
    original context 8192, fixed); None = no scaling."""

    norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm/RMSNorm (Megatron's layernorm_epsilon)."""

    tokenizer_vocab_size: int | None = None
    """Real tokens among the vocab_size embedding rows; the rows past it are padding (so that every TP
    size divides the table) and their logits are masked to -inf: they never win a prediction or take
    probability mass from a target. None = every row is a token (no masking)."""

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size} "
                    "(or set kv_channels)"
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        elif not isinstance(self.kv_channels, int) or self.kv_channels < 1:
            raise ValueError(f"kv_channels must be a positive int, got {self.kv_channels!r}")
        if self.position_embedding_type not in _POSITION_TYPES:
            raise ValueError(f"position_embedding_type must be one of {_POSITION_TYPES}")
        if self.position_embedding_type == "rope" and (self.kv_channels % 2):
            raise ValueError(f"rope needs an even head dim, got {self.kv_channels}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")
        if self.normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}")
        std = self.init_method_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
            raise ValueError(f"init_method_std must be a number > 0 (e.g. 0.02 or 2e-2), got {std!r}")
        if not isinstance(self.gated_linear_unit, bool):
            raise ValueError(f"gated_linear_unit must be true or false, got {self.gated_linear_unit!r}")
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        elif not isinstance(self.num_query_groups, int) or isinstance(self.num_query_groups, bool):
            raise ValueError(f"num_query_groups must be a positive int, got {self.num_query_groups!r}")
        if not 1 <= self.num_query_groups <= self.num_attention_heads or (
            self.num_attention_heads % self.num_query_groups
        ):
            raise ValueError(
                f"num_query_groups={self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}"
            )
        for name in ("add_bias_linear", "add_qkv_bias", "share_embeddings_and_output_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.rotary_base, int) or isinstance(self.rotary_base, bool) or self.rotary_base < 1:
            raise ValueError(f"rotary_base must be a positive int, got {self.rotary_base!r}")
        if self.rope_scaling_factor is not None:
            if self.position_embedding_type != "rope":
                raise ValueError("rope_scaling_factor needs position_embedding_type 'rope'")
            if not isinstance(self.rope_scaling_factor, (int, float)) or not self.rope_scaling_factor >= 1:
                raise ValueError(f"rope_scaling_factor must be a number >= 1, got {self.rope_scaling_factor!r}")
        if not isinstance(self.norm_epsilon, (int, float)) or not 0 < self.norm_epsilon < 1:
            raise ValueError(f"norm_epsilon must be in (0, 1), got {self.norm_epsilon!r}")
        if self.tokenizer_vocab_size is not None and (
            not isinstance(self.tokenizer_vocab_size, int)
            or isinstance(self.tokenizer_vocab_size, bool)
            or not 1 <= self.tokenizer_vocab_size <= self.vocab_size
        ):
            raise ValueError(
                f"tokenizer_vocab_size={self.tokenizer_vocab_size!r} must be an int in "
                f"[1, vocab_size={self.vocab_size}]"
            )

    def check_parallel(self, tp: int, pp: int, vpp: int = 1) -> None:
        """Raise ValueError unless this model splits evenly over TP x PP ranks (x VPP chunks per rank)."""
        if tp < 1 or pp < 1 or vpp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} vpp={vpp}")
        if vpp > 1 and pp < 2:
            raise ValueError(f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2")
        for name, size in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
            ("vocab_size", self.vocab_size),
        ):
            if size % tp:
                raise ValueError(f"tensor_model_parallel_size={tp} must divide {name}={size}")
        if self.num_layers % (pp * vpp):
            what = f"pipeline_model_parallel_size={pp}" + (
                f" x virtual_pipeline_model_parallel_size={vpp}" if vpp > 1 else ""
            )
            raise ValueError(f"{what} must divide num_layers={self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are an error (catches YAML typos early)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing model config keys: {missing}")
        # a size written 4.0 or 1e3 (a float to YAML) is the whole number it says; 2.5 stays and is rejected
        ints = {f.name for f in fields(cls) if f.type in ("int", "int | None")}
        data = {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}
        return cls(**data)


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a model config from YAML (config/models/*.yaml) or JSON (a run's model.json).

    YAML goes through the strict loader: duplicate keys are errors, ``2e-2`` is a float. An HF checkpoint's
    ``config.json`` is HF's format, not ours: flanpipe.model.hf_format.load_model_file reads both."""
    if Path(path).name == "config.json":
        raise ValueError(f"{path}: an HF checkpoint's config.json; flanpipe.model.hf_format.load_model_file reads it")
    data = json.loads(Path(path).read_text()) if str(path).endswith(".json") else read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return ModelConfig.from_dict(data)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the full (unsharded) model, written out like nanoGPT.

    Per layer, with query width d = heads x kv_channels (= h unless kv_channels is set) and key/value
    width g = query groups x kv_channels (= d without GQA):
    2 norms (weight+bias for LayerNorm, weight only for RMSNorm),
    qkv = h*(d+2g) + (d+2g if biases), proj = d*h + (h if biases),
    fc1 = h*f*(2 if GLU) + (f*(2 if GLU) if biases), fc2 = f*h + (h if biases).
    Plus token embedding V*h, learned positions P*h, the final norm and, unless tied, the output V*h.
    """
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    norm = 2 * h if cfg.normalization == "LayerNorm" else h
    glu = 2 if cfg.gated_linear_unit else 1
    bias = 1 if cfg.add_bias_linear else 0
    qkv_bias = 1 if (cfg.add_bias_linear or cfg.add_qkv_bias) else 0
    d = cfg.num_attention_heads * cfg.kv_channels
    g = cfg.num_query_groups * cfg.kv_channels
    attention = (h * (d + 2 * g) + qkv_bias * (d + 2 * g)) + (d * h + bias * h)
    mlp = (h * f * glu + bias * f * glu) + (f * h + bias * h)
    per_layer = 2 * norm + attention + mlp
    positions = cfg.max_position_embeddings * h if cfg.position_embedding_type != "rope" else 0
    output = 0 if cfg.share_embeddings_and_output_weights else v * h
    return cfg.num_layers * per_layer + v * h + positions + norm + output


def lookup_params(cfg: ModelConfig) -> int:
    """Parameters read by table lookup, not by a matmul: the token embedding V x h, plus the learned
    position table P x h (rope has none). They cost no FLOPs and live on the first pipeline stage."""
    positions = cfg.max_position_embeddings * cfg.hidden_size if cfg.position_embedding_type != "rope" else 0
    return cfg.vocab_size * cfg.hidden_size + positions


def flops_per_token(cfg: ModelConfig, seq_length: int) -> int:
    """Model FLOPs of one training token (forward + backward), as in PaLM (app. B) and nanoGPT.

    Every matmul weight takes part in one multiply-add per token: 2 FLOPs in the forward pass and 4
    in the backward (the gradient of the input and of the weight), so 6 N, with N = param_count -
    lookup_params (the output layer is a matmul and counts, tied or not). Attention adds two matmuls per
    layer that have no weights: scores Q K^T and the weighted sum A V, each 2 x T x d_attn FLOPs per
    token forward (d_attn = heads x kv_channels, T = seq_length: the dense attention computes every
    column of the packed row, masked or not), x 3 with the backward: 12 x L x d_attn x T.

        flops/token = 6 N + 12 L d_attn T

    e.g. 2 layers, hidden 64, vocab 64, rope, T = 32: N = 75,264 - 64 x 64 = 71,168, so
    6 x 71,168 + 12 x 2 x 64 x 32 = 427,008 + 49,152 = 476,160.
    """
    # a tied output layer is still a matmul (its weights are the embedding's, counted once in N)
    tied = cfg.vocab_size * cfg.hidden_size if cfg.share_embeddings_and_output_weights else 0
    n_matmul = param_count(cfg) - lookup_params(cfg) + tied
    d_attn = cfg.num_attention_heads * cfg.kv_channels
    return 6 * n_matmul + 12 * cfg.num_layers * d_attn * seq_length
