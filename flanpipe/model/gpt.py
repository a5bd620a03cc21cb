"""The decoder-only LM built by Megatron-Core, and how eval loads it back.

One ``ModelConfig`` (flanpipe.core.model_config; the keys of config/models/{name}.yaml) feeds both training and
evaluation:
``model_provider`` builds a Megatron-Core ``GPTModel`` for one pipeline stage, ``load_scorer``
rebuilds it in a single process (TP=1, PP=1) from a training run's output directory.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flanpipe.core.model_config import ModelConfig, load_model_config
from flanpipe.model import megatron_compat


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (GPT-2's ``gelu_new``): it differs from exact GELU by ~1e-3, so a
    converted GPT-2 needs this very function to give the same logits."""
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu, "silu": F.silu}


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

    CPU: none of Megatron's kernels (megatron_compat.cpu_transformer_overrides), but a gated SiLU takes
    the bias+SwiGLU fusion's path, which megatron_compat computes eagerly (``_swiglu_cpu``: no copy of
    the linear half, one gradient tensor). GPU: Megatron's torch.jit bias+activation
    (gelu, or gated silu: the forms it fuses) and bias+dropout+add always; the masked softmax with
    apex's kernel; RoPE with Transformer Engine's; weight-gradient accumulation into main_grad with
    TE or apex's kernel; the persistent LayerNorm with apex's. The cross-entropy stays unfused.
    """
    if not on_gpu:
        swiglu = cfg.activation == "silu" and cfg.gated_linear_unit
        return {**megatron_compat.cpu_transformer_overrides(), "bias_activation_fusion": swiglu}
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
    init_weights: bool = True,
):
    """Megatron TransformerConfig for ``cfg`` on a TP x PP grid (x VPP model chunks per PP rank).

    ``te``: whether the layers use the Transformer Engine spec (default: when TE is usable); it
    decides which fusions have kernels (``fusion_flags``).

    ``init_weights=False``: leave the parameters uninitialised (``torch.empty``: no page touched) for a
    caller that overwrites them all, e.g. flanpipe.model.hf_import's import (Megatron's CPU init builds each
    weight twice, a master copy and the parameter, which doubles a converter's peak memory).

    ``bf16``: parameters, activations and pipeline messages in bfloat16; the optimizer keeps fp32
    master weights (flanpipe.train.optim.BF16Optimizer) and DDP reduces gradients in fp32.

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
        num_query_groups=cfg.num_query_groups,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=_ACTIVATIONS[cfg.activation],
        normalization=cfg.normalization,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        bf16=bf16,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        calculate_per_token_loss=True,
        perform_initialization=init_weights,
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
    init_weights: bool = True,
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
    config = transformer_config(cfg, tp, pp, vpp=vpp, bf16=bf16, te=use_te, init_weights=init_weights)
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
        spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    if not use_te and not torch.cuda.is_available():
        megatron_compat.use_cpu_norms(model)  # RMSNorm's backward by hand (its CPU kernel has none)
    if post_process and cfg.tokenizer_vocab_size is not None and cfg.tokenizer_vocab_size < cfg.vocab_size:
        mask_padded_vocab(model.output_layer, cfg.tokenizer_vocab_size, cfg.vocab_size, tp)
    model.flanpipe_uses_te = use_te  # forward_step feeds TE packed rows as THD, local a mask
    return model


_SDPA_CORE_ATTENTION: type | None = None
_SDPA_MASK: dict[str, Any] = {}


def _sdpa_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Megatron's bool mask (True = masked) as SDPA's additive one (0 / -inf), or None when a row may attend
    to nothing (SDPA would give NaN there; Megatron softmaxes it uniformly: its own path takes it).

    Every layer of a forward gets the same mask object; the answer for it is kept while that object lives (a
    weak reference: the cache empties when the batch's mask is freed, so no [b, 1, s, s] float outlives its
    batch), which spares each layer a pass over the mask for the check and SDPA's own bool-to-float
    conversion, forward and backward: ~3.5 ms of a 285 ms training step of the default's packed rows (1
    thread; the profile's `all`, `bitwise_not` and `where` rows). The additive mask is what SDPA builds from
    the bool one: same results.
    """
    held = _SDPA_MASK.get("mask")
    if held is None or held() is not attention_mask:
        additive = None
        if not bool(attention_mask.all(dim=-1).any()):
            additive = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
            additive.masked_fill_(attention_mask, float("-inf"))
        _SDPA_MASK.clear()
        _SDPA_MASK.update(mask=weakref.ref(attention_mask, lambda _: _SDPA_MASK.clear()), additive=additive)
    return _SDPA_MASK["additive"]


def sdpa_core_attention() -> type:
    """Megatron's local ``DotProductAttention`` computed by ``F.scaled_dot_product_attention``.

    The local spec's attention materialises the [b*heads, s, s] scores, masks, softmaxes and
    multiplies in separate passes (and their backward); torch's fused kernel takes the same dense
    boolean mask (packed rows' block-diagonal one, Megatron's True = masked out) in one pass, ~3x
    faster on a CPU. Same math up to float rounding (~1e-7). Cases it does not cover (bf16,
    attention dropout, a softmax offset, query-key layer scaling, a non-boolean mask or one with a
    row that attends to nothing, no mask outside plain causal self-attention, a KV cache with
    fewer queries than keys) go to Megatron's own path.
    """
    global _SDPA_CORE_ATTENTION
    if _SDPA_CORE_ATTENTION is not None:
        return _SDPA_CORE_ATTENTION
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SdpaDotProductAttention(DotProductAttention):
        """DotProductAttention by torch's fused scaled-dot-product kernel where it applies."""

        def forward(
            self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
        ):
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            plain = (
                query.dtype == torch.float32
                and attention_bias is None
                and packed_seq_params is None
                and getattr(self, "softmax_offset", None) is None
                and (not self.training or self.config.attention_dropout == 0.0)
                and query.shape[0] == key.shape[0]
                and not self.config.apply_query_key_layer_scaling
                and (attention_mask.dtype == torch.bool if attention_mask is not None else causal)
            )
            mask = None if not plain or attention_mask is None else _sdpa_mask(attention_mask)
            # a row that may attend to nothing (no additive mask): Megatron softmaxes it uniformly, SDPA gives NaN
            plain = plain and (attention_mask is None or mask is not None)
            if not plain:
                return super().forward(
                    query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
                )
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:
                key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
            # [s, b, heads, dim] -> [b, heads, s, dim], each head's rows contiguous: in Megatron's layout
            # consecutive positions of one head lie b x heads x dim floats apart (8 KiB on the bench model),
            # and the kernel's strided reads (and its gradients' strided writes) cost more than these copies:
            # forward + backward of one bench layer 27.1 vs 31.5 ms CPU (1 thread, 30 rounds interleaved).
            q, k, v = (x.permute(1, 2, 0, 3).contiguous() for x in (query, key, value))
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
            )
            s, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

    _SDPA_CORE_ATTENTION = SdpaDotProductAttention
    return SdpaDotProductAttention


def _hidden_at(
    at: tuple[torch.Tensor, torch.Tensor], module: torch.nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """Forward pre-hook of the output layer: its input [s, b, h] cut to the positions ``at`` = (rows [P, 1],
    cols [P, J]), laid out [J, P, h], so that GPTModel's closing [s, b] -> [b, s] transpose returns [P, J, V]."""
    rows, cols = at
    hidden = args[0]
    return (hidden[cols.t(), rows.t()], *args[1:]), kwargs


@contextmanager
def logits_at(output_layer: torch.nn.Module | None, at: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """While open, ``output_layer`` (a GPTModel's, the last pipeline stage's) runs only on the positions
    ``at`` = (rows [P, 1], cols [P, J]): the model returns logits [P, J, V] (or, given labels [P, J], their
    cross entropy [P, J]) instead of [b, s, ...]. The cut Megatron makes itself for last-token logits
    (``materialize_only_last_token_logits``), at any positions.

    Why: the output layer costs 2 h V FLOPs per position forward (4 h V backward) and its logits 4 V bytes,
    for positions that may never be read: rank classification reads each option token's predictor, and
    instruction tuning trains on the targets alone (a quarter of the default's packed positions). The
    positions' hidden states are those of the full forward, so what is computed is the same up to float
    summation order. ``at`` or ``output_layer`` None (a stage without one) changes nothing. The cut needs
    the whole sequence at the output layer: with sequence parallelism (never on in flanpipe) it is refused.
    """
    if at is None or output_layer is None:
        yield
        return
    if getattr(output_layer, "sequence_parallel", False):
        raise ValueError("logits_at: the output layer's input is split over the sequence (sequence parallelism)")
    hook = output_layer.register_forward_pre_hook(partial(_hidden_at, at), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def mask_padded_vocab(output_layer: torch.nn.Module, real: int, padded: int, tp: int) -> None:
    """Set the logits of the padding rows (ids >= ``real``) to -inf after ``output_layer``.

    The output is vocab-parallel: TP rank r holds ids [r*V/tp, (r+1)*V/tp), so each rank masks the
    padding ids in its own slice. With -inf a padding id never wins an argmax, its softmax probability
    (in Megatron's vocab-parallel cross entropy as in a plain softmax) is exactly 0, so the loss equals
    that of the unpadded model, and no gradient reaches the padding rows.
    """
    from megatron.core import parallel_state

    per_rank = padded // tp

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        logits, bias = output
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank if tp > 1 else 0
        first_pad = real - start
        if first_pad >= logits.shape[-1]:
            return output
        keep = torch.arange(logits.shape[-1], device=logits.device) < first_pad
        return logits.masked_fill(~keep, float("-inf")), bias

    output_layer.register_forward_hook(hook)


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


class LMScorer:
    """Plain causal LM over right-padded rows, for evaluation (one process, TP=1/PP=1).

    A Megatron checkpoint seen through flanpipe.eval.evaluate's ``Scorer`` protocol.
    """

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


def load_scorer(model_dir: str | os.PathLike[str]) -> LMScorer:
    """Rebuild a trained model from ``model_dir`` (model.json + checkpoint/) for scoring."""
    model_dir = Path(model_dir)
    megatron_compat.quiet_warnings()
    init_single_process()
    cfg = load_model_config(model_dir / "model.json")
    model = model_provider(cfg, pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model = model.cuda()
    from flanpipe.model.checkpointing import load_weights

    load_weights(model, model_dir / "checkpoint")
    return LMScorer(model, cfg)
