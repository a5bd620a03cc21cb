"""The decoder-only LM: its config, how Megatron builds it, and how eval loads it back.

One ``ModelConfig`` (the keys of config/models/{name}.yaml) feeds both training and evaluation:
``model_provider`` builds a Megatron-Core ``GPTModel`` for one pipeline stage, ``load_scorer``
rebuilds it in a single process (TP=1, PP=1) from a training run's output directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from flanpipe import megatron_compat

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
_POSITION_TYPES = ("rope", "learned_absolute")
_NORMALIZATIONS = ("LayerNorm", "RMSNorm")


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
    """MLP nonlinearity: gelu, relu or silu."""

    normalization: str = "LayerNorm"
    """Pre-norm type: LayerNorm or RMSNorm."""

    init_method_std: float = 0.02
    """Std of the normal init of weight matrices (output layers scaled by 1/sqrt(2*layers))."""

    kv_channels: int | None = None
    """Per-head width; default hidden_size / num_attention_heads. LaMDA-PT 137B uses 128 heads of 128
    on d_model 8192, i.e. attention 16,384 wide: set it explicitly for such models."""

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
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}")
        if self.normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}")
        if not self.init_method_std > 0:
            raise ValueError("init_method_std must be > 0")

    def check_parallel(self, tp: int, pp: int, vpp: int = 1) -> None:
        """Raise ValueError unless this model splits evenly over TP x PP ranks (x VPP chunks per rank)."""
        if tp < 1 or pp < 1 or vpp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} vpp={vpp}")
        if vpp > 1 and pp < 2:
            raise ValueError(f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2")
        for name, size in (
            ("num_attention_heads", self.num_attention_heads),
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
        return cls(**data)


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a model config from YAML (config/models/*.yaml) or JSON (a run's model.json)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return ModelConfig.from_dict(data)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the full (unsharded) model, written out like nanoGPT.

    Per layer, with attention width d = heads x kv_channels (= h unless kv_channels is set):
    2 norms (weight+bias for LayerNorm, weight only for RMSNorm),
    qkv = h*3d + 3d, proj = d*h + h, fc1 = h*f*(2 if GLU) + f*(2 if GLU), fc2 = f*h + h.
    Plus token embedding V*h, learned positions P*h, the final norm and an untied output V*h.
    """
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    norm = 2 * h if cfg.normalization == "LayerNorm" else h
    glu = 2 if cfg.gated_linear_unit else 1
    d = cfg.num_attention_heads * cfg.kv_channels
    attention = (h * 3 * d + 3 * d) + (d * h + h)
    mlp = (h * f * glu + f * glu) + (f * h + h)
    per_layer = 2 * norm + attention + mlp
    positions = cfg.max_position_embeddings * h if cfg.position_embedding_type != "rope" else 0
    return cfg.num_layers * per_layer + v * h + positions + norm + v * h


def te_available() -> bool:
    """True when the Transformer Engine layer spec can be used (TE importable and CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# NVIDIA apex's compiled extensions that Megatron's fusions import (probed by module name: the PyPI
# package called "apex" is an unrelated project and provides none of them).
APEX_EXTENSIONS = ("scaled_masked_softmax_cuda", "fused_weight_gradient_mlp_cuda", "fast_layer_norm")


def apex_extensions() -> frozenset[str]:
    """Which of APEX_EXTENSIONS are installed (found, not imported: no CUDA initialisation)."""
    return frozenset(name for name in APEX_EXTENSIONS if importlib.util.find_spec(name) is not None)


def fusion_flags(cfg: ModelConfig, *, on_gpu: bool, te: bool, apex: frozenset[str]) -> dict[str, bool]:
    """The Megatron fusions a run turns on: each where its kernel exists, plain torch ops otherwise.

    CPU: none (megatron_compat.cpu_transformer_overrides). GPU: Megatron's torch.jit bias+activation
    (gelu, or gated silu: the forms it fuses) and bias+dropout+add always; the masked softmax with
    apex's kernel; RoPE with Transformer Engine's; weight-gradient accumulation into main_grad with
    TE or apex's kernel; the persistent LayerNorm with apex's. The cross-entropy stays unfused.
    """
    if not on_gpu:
        return megatron_compat.cpu_transformer_overrides()
    return {
        "bias_activation_fusion": cfg.activation == "gelu" or (cfg.activation == "silu" and cfg.gated_linear_unit),
        "bias_dropout_fusion": True,
        "masked_softmax_fusion": "scaled_masked_softmax_cuda" in apex,
        "apply_rope_fusion": te and cfg.position_embedding_type == "rope",
        "gradient_accumulation_fusion": te or "fused_weight_gradient_mlp_cuda" in apex,
        "persist_layer_norm": "fast_layer_norm" in apex and cfg.normalization == "LayerNorm",
        "cross_entropy_loss_fusion": False,
    }


def transformer_config(
    cfg: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    on_gpu: bool | None = None,
    *,
    vpp: int = 1,
    bf16: bool = False,
    te: bool | None = None,
):
    """Megatron TransformerConfig for ``cfg`` on a TP x PP grid (x VPP model chunks per PP rank).

    ``te``: whether the layers use the Transformer Engine spec (default: when TE is usable); it
    decides which fusions have kernels (``fusion_flags``).

    ``bf16``: parameters, activations and pipeline messages in bfloat16; the optimizer keeps fp32
    master weights (flanpipe.optim.BF16Optimizer) and DDP reduces gradients in fp32.

    Dropout is off: runs are short, and it keeps TP/PP runs bit-comparable with TP=1.
    Per-token loss: the schedule sums token losses and finalize_model_grads divides by the
    global count of target tokens, so the loss is a token mean over the whole global batch
    whatever the split into micro-batches, DP ranks or pipeline stages.
    """
    from megatron.core.transformer import TransformerConfig

    cfg.check_parallel(tp, pp, vpp)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    dtype = torch.bfloat16 if bf16 else torch.float32
    te = te_available() if te is None else te
    extra = fusion_flags(cfg, on_gpu=on_gpu, te=on_gpu and te, apex=apex_extensions() if on_gpu else frozenset())
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=_ACTIVATIONS[cfg.activation],
        normalization=cfg.normalization,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        bf16=bf16,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        calculate_per_token_loss=True,
        **extra,
    )


def model_provider(
    cfg: ModelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    *,
    tp: int = 1,
    pp: int = 1,
    use_te: bool | None = None,
    vp_stage: int | None = None,
    vpp: int = 1,
    bf16: bool = False,
):
    """Build this rank's GPTModel stage (embedding on the first stage, output layer on the last);
    with ``vpp`` > 1, its model chunk ``vp_stage`` (layers interleaved over the PP ranks).

    Layer spec: Transformer Engine when importable on a GPU (``use_te=None`` decides), else
    Megatron's local spec, which takes the dense block-diagonal mask packed rows need.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    megatron_compat.apply()
    use_te = te_available() if use_te is None else use_te
    config = transformer_config(cfg, tp, pp, vpp=vpp, bf16=bf16, te=use_te)
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type=cfg.position_embedding_type,
        vp_stage=vp_stage,
    )
    model.flanpipe_uses_te = use_te  # forward_step feeds TE packed rows as THD, local a mask
    return model


def init_single_process() -> None:
    """A 1-process torch.distributed group + TP=1/PP=1 Megatron state, unless one exists.

    Megatron's layers read their parallel group sizes from parallel_state even for one process.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    megatron_compat.apply()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise RuntimeError(f"need TP=1/PP=1 Megatron state, found TP={tp} PP={pp}")
    # Attention forks Megatron's model-parallel RNG state around dropout even in eval mode, so a
    # fresh process needs the tracker seeded; a training run in this process already did it.
    from megatron.core import tensor_parallel

    if "model-parallel-rng" not in tensor_parallel.get_cuda_rng_tracker().get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def chunks_sharded_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """One sharded state dict for a rank's model chunks. Their sharded tensors carry global layer
    numbers, so what one layout saves another loads; dist_checkpointing checks that all ranks together
    touch every shard exactly once, so a rank's chunks must be saved and loaded in one call."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(model: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike[str]) -> None:
    """Save model weights with dist_checkpointing (every rank writes its shards; collective).

    A list is the model chunks of an interleaved pipeline; the checkpoint loads into one unsplit model
    (or any other layout) all the same.
    """
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(chunks_sharded_state(model if isinstance(model, list) else [model]), str(ckpt_dir))


def load_checkpoint(model: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike[str]) -> None:
    """Load weights saved under any TP/PP layout into ``model`` or a rank's model chunks (collective)."""
    from megatron.core import dist_checkpointing

    chunks = model if isinstance(model, list) else [model]
    load_chunks_state(chunks, dist_checkpointing.load(chunks_sharded_state(chunks), str(ckpt_dir)))


def load_chunks_state(chunks: list[torch.nn.Module], state: dict[str, Any]) -> None:
    """Put a loaded ``chunks_sharded_state`` back into the chunks."""
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


class Scorer:
    """Plain causal LM over right-padded rows, for evaluation (one process, TP=1/PP=1)."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig):
        self.model = model.eval()
        self.cfg = cfg
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [b, s, V] for tokens [b, s]; position i sees tokens 0..i of its own row.

        Right padding needs no mask: a causal model never looks ahead at the pads.
        """
        b, s = tokens.shape
        if s > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {s} > max_position_embeddings")
        ids = tokens.to(self.device, torch.long)
        positions = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)
        # attention_mask=None selects the spec's causal mask (the local and TE specs alike).
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=None)
        return out.float().to(tokens.device)


def load_scorer(model_dir: str | os.PathLike[str]) -> Scorer:
    """Rebuild a trained model from ``model_dir`` (model.json + checkpoint/) for scoring."""
    model_dir = Path(model_dir)
    megatron_compat.quiet_warnings()
    init_single_process()
    cfg = load_model_config(model_dir / "model.json")
    model = model_provider(cfg, pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model = model.cuda()
    load_checkpoint(model, model_dir / "checkpoint")
    return Scorer(model, cfg)
