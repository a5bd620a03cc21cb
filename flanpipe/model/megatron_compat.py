"""Make Megatron-Core 0.16 run on a CPU-only torch build.

Megatron-Core assumes CUDA: it creates tensors with a hard-coded ``device="cuda"``, uses
``torch.cuda.current_device()`` as a device, keeps its RNG tracker on the CUDA generator and
asserts ``torch.cuda.FloatTensor`` grads. This module is the only place in flanpipe that knows.

The fix is deliberately narrow: instead of monkey-patching ``torch.cuda`` for the whole process,
each affected Megatron module gets its own ``torch`` name rebound to a thin view of torch whose
tensor factories map a CUDA device to the CPU and whose ``torch.cuda`` answers
``current_device()`` with the CPU device and makes ``synchronize()`` a no-op. Everything else
forwards to the real torch, so code outside those modules sees torch unchanged.

``apply()`` is a no-op when CUDA is available, so the GPU path runs unpatched Megatron.

Importing this module imports ``megatron.core`` (every flanpipe module that imports it is about to use
Megatron), with ``torch.compile`` deferred to first call while Megatron loads (``import_megatron``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

_CPU = torch.device("cpu")
_APPLIED = False

# Megatron modules whose module-level ``torch`` is rebound to the CPU view, and the Megatron
# function on a CPU run's path that needs it (training fwd/bwd, 1F1B, clipping, DDP buffers,
# dist_checkpointing save/load, model.LMScorer). Each entry was checked necessary by removing it
# (TP=2, PP=2, DP=2 training, save, load at another layout, scoring); modules only reached with
# sequence parallelism, fully-parallel loading or the rerun machinery are deliberately absent.
_CPU_TORCH_MODULES: dict[str, str] = {
    # get_default_causal_mask: torch.ones(sq, sq, device="cuda") when no mask is passed (model.LMScorer).
    "megatron.core.transformer.utils": "default causal mask",
    # forward_backward_no_pipelining / forward_backward_pipelining_without_interleaving:
    # total_num_tokens = torch.zeros([], device="cuda").
    "megatron.core.pipeline_parallel.schedules": "num-tokens counter",
    # P2PCommunicator._communicate (create_tensor_recv_prev/next): PP receive buffers on
    # torch.cuda.current_device(); torch.cuda.synchronize() after batched isend/irecv.
    "megatron.core.pipeline_parallel.p2p_communication": "p2p receive buffers",
    # get_grad_norm_fp32: total_norm_cuda = torch.tensor(..., device="cuda") for the all-reduce.
    "megatron.core.optimizer.clip_grads": "grad-norm reduction buffer",
    # FP32Optimizer.__init__: self._scale = torch.tensor([1.0], device="cuda").
    # (clip_grad_by_total_norm_fp32, imported into this module, is replaced in apply().)
    "megatron.core.optimizer.optimizer": "fp32 optimizer loss scale",
    # _ParamAndGradBuffer.__init__ (built by DistributedDataParallel): grad_data on
    # torch.cuda.current_device().
    "megatron.core.distributed.param_and_grad_buffer": "DDP contiguous grad buffer",
    # RotaryEmbedding.get_emb: moves inv_freq to torch.cuda.current_device() on first use.
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "rotary frequencies",
    # save_state_dict_async_finalize: failure flag broadcast on torch.cuda.current_device().
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "checkpoint save flags",
    # FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize() before copying to host.
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "checkpoint writer sync",
    # _gather_along_last_dim: the all-gather output of TP logits (runtime_gather_output, flanpipe.eval.inference)
    # on torch.cuda.current_device().
    "megatron.core.tensor_parallel.mappings": "TP logits gather buffer",
    # GlobalMemoryBuffer.get_tensor (DotProductAttention's matmul buffer) on current_device().
    "megatron.core.utils": "attention score buffer",
}


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling (int index, "cuda", "cuda:0", torch.device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that a CUDA ``device=`` argument lands on the CPU."""

    def wrapped(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("pin_memory", None)  # pinning needs CUDA; meaningless for CPU tensors
        return factory(*args, device=_cpu_device(device), **kwargs)

    wrapped.__name__ = getattr(factory, "__name__", "factory")
    wrapped.__doc__ = factory.__doc__
    return wrapped


def _cpu_current_device() -> torch.device:
    return _CPU


def _no_sync(device: Any = None) -> None:
    return None


class _ForwardingModule(types.ModuleType):
    """A module object whose missing attributes come from ``target`` (PEP 562 style)."""

    def __init__(self, name: str, target: types.ModuleType, overrides: dict[str, Any]):
        super().__init__(name)
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _cpu_torch() -> types.ModuleType:
    """A view of ``torch`` for Megatron modules: CUDA devices become the CPU device."""
    cuda = _ForwardingModule(
        "torch.cuda",
        torch.cuda,
        {"current_device": _cpu_current_device, "synchronize": _no_sync},
    )
    factories = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like")
    overrides: dict[str, Any] = {name: _on_cpu(getattr(torch, name)) for name in factories}
    overrides["cuda"] = cuda
    return _ForwardingModule("torch", torch, overrides)


def _clip_grad_by_total_norm_cpu(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """CPU twin of ``clip_grads.clip_grad_by_total_norm_fp32``.

    The original asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``, which a CPU grad can
    never satisfy. Same math: scale every grad in place by max_norm / (total_norm + 1e-6) when
    that is < 1.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_([g.detach() for g in grads], clip_coeff)


def _allocate_kv_cache_cpu(self: Any, inference_max_sequence_length: int, batch_size: int, dim: int, dtype: Any):
    """CPU twin of ``Attention._allocate_memory``: one layer's key or value cache for inference."""
    return torch.empty(
        inference_max_sequence_length, batch_size, self.num_query_groups_per_partition, dim, dtype=dtype, device=_CPU
    )


def _make_cpu_rng_tracker_class(base: type) -> type:
    """Subclass Megatron's CudaRNGStatesTracker so its named states live on the CPU generator.

    ``model_parallel_cuda_manual_seed`` adds three named states (data-parallel seed,
    seed + 2718 + tp_rank, expert seed) and layers ``fork()`` them around dropout and weight
    init. Keeping the class (a subclass) keeps every isinstance check in Megatron working.
    """

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """RNG tracker with the CudaRNGStatesTracker API over torch's CPU generator."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def cpu_transformer_overrides() -> dict[str, Any]:
    """TransformerConfig fields a CPU run needs: CPU weight init and every CUDA fusion off."""
    return {
        "use_cpu_initialization": True,
        "masked_softmax_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        "cross_entropy_loss_fusion": False,
    }


def _compile_on_first_call(compile_: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` as a decorator that calls ``compile_`` when the decorated function first runs.

    ``torch.compile(fn)`` compiles lazily anyway (at the first call), but the decoration itself imports
    torch._dynamo and torch._inductor (and sympy through them). Modules and other non-functions go to
    ``compile_`` at once."""

    def compile_lazily(fn: Any = None, **options: Any) -> Any:
        if fn is None:  # torch.compile(**options)(fn)
            return functools.partial(compile_lazily, **options)
        if not isinstance(fn, types.FunctionType):
            return compile_(fn, **options)
        compiled = None

        @functools.wraps(fn)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_(fn, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return compile_lazily


def import_megatron() -> None:
    """Import ``megatron.core`` with its ``@jit_fuser`` functions compiled on first call (idempotent).

    Megatron binds ``jit_fuser = torch.compile`` when it loads and decorates ~40 fusion kernels with it
    at import, which imports torch._dynamo and torch._inductor: 3.0-3.3 s of CPU for ``import
    megatron.core`` vs 1.35 s with the decoration deferred (three runs each on the shared 2-core
    machine, CPU seconds, load 10-11). On a CPU none of those kernels ever runs (``fusion_flags``); on
    a GPU each compiles at its first call, as torch.compile would. A no-op once Megatron is loaded.
    """
    if "megatron.core.jit" in sys.modules:
        return
    quiet_warnings()  # Megatron warns at import that TE/Apex are absent
    real = torch.compile
    torch.compile = _compile_on_first_call(real)  # type: ignore[assignment]
    try:
        import megatron.core  # noqa: F401
        import megatron.core.jit  # noqa: F401  # (where jit_fuser is bound: loaded by megatron.core today)
    finally:
        torch.compile = real  # type: ignore[assignment]


def save_results_in_process() -> None:
    """Let dist_checkpointing's synchronous saves pass their write results through an in-process queue.

    Its torch_dist writer collects results in a module-level queue that it creates, on first use, as
    ``multiprocessing.get_context("spawn").Manager().Queue()``: a server process that starts a fresh
    interpreter and re-imports the caller's ``__main__`` (for a training rank, flanpipe.train.loop with
    torch and Megatron), 2-4 s before a job's first save can finish. That queue exists for async saves,
    which run the writer in a background process; a synchronous save (the only kind flanpipe makes)
    puts and gets the results in the calling process, where ``queue.Queue`` does the same. The bytes
    written are the same (the forked per-bucket writers are untouched). Idempotent.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def quiet_warnings() -> None:
    """Hide known, harmless warnings that would otherwise fill every training log.

    Megatron warns at import that TE/Apex are absent (it falls back to torch ops, as intended
    here) and, from TransformerConfig's defaults, that cuda_graph_scope "full" is deprecated;
    torch's checkpoint planner warns on every dist_checkpointing save/load that ShardedTensor
    (which Megatron 0.16 still uses) is deprecated.
    """
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message="Apex is not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)


def apply() -> None:
    """Patch Megatron-Core for a CPU-only torch (idempotent; a no-op when CUDA is available)."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return

    cpu_torch = _cpu_torch()
    for name in _CPU_TORCH_MODULES:
        module = importlib.import_module(name)
        module.torch = cpu_torch  # type: ignore[attr-defined]

    # FP32Optimizer.clip_grad_norm -> clip_grad_by_total_norm_fp32 (imported by name into
    # megatron.core.optimizer.optimizer): replace its CUDA grad-type assert.
    from megatron.core.optimizer import optimizer as mc_optimizer

    mc_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    # tensor_parallel.random.initialize_rng_tracker instantiates the module-level class name
    # CudaRNGStatesTracker; point it at the CPU subclass and drop any tracker already built.
    from megatron.core.tensor_parallel import random as mc_random

    mc_random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(mc_random.CudaRNGStatesTracker)
    mc_random._CUDA_RNG_STATE_TRACKER = None
    mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False

    # Attention._allocate_memory (the KV cache of StaticInferenceContext, flanpipe.eval.inference) allocates on
    # torch.cuda.current_device(); the rest of megatron.core.transformer.attention must keep the real
    # torch, so only this method is replaced (same shape [max_seq, max_batch, groups, dim], on the CPU).
    from megatron.core.transformer import attention as mc_attention

    mc_attention.Attention._allocate_memory = _allocate_kv_cache_cpu

    # LanguageModule.setup_embeddings_and_output_layer (tied embeddings at PP > 1) moves the last
    # stage's copy of the table with Tensor.cuda() before all-reducing it over the embedding group:
    # a tensor method, so no module's torch name reaches it; keep the tensor on the CPU for that call.
    from megatron.core.models.common.language_module import language_module as mc_language_module

    mc_language_module.LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        mc_language_module.LanguageModule.setup_embeddings_and_output_layer
    )

    # CPU speed (bench train --peer): Megatron's unfused RoPE copies q and k twice (a cat with an
    # empty pass-through slice, and rotate_half's cat), its vocab-parallel cross entropy at TP=1 does
    # by hand, in several passes, what one fused log-softmax kernel does, and its bias+SwiGLU fusion
    # (what flanpipe.model.gpt.fusion_flags turns on for a gated SiLU) is a torch.compile kernel.
    from megatron.core import tensor_parallel as mc_tensor_parallel
    from megatron.core.models.common.embeddings import rope_utils as mc_rope_utils
    from megatron.core.transformer import mlp as mc_mlp

    mc_mlp.bias_swiglu_impl = _swiglu_cpu

    mc_rope_utils._apply_rotary_pos_emb_bshd = _rope_bshd_halves(mc_rope_utils._apply_rotary_pos_emb_bshd)
    mc_tensor_parallel.vocab_parallel_cross_entropy = _plain_cross_entropy_at_tp1(
        mc_tensor_parallel.vocab_parallel_cross_entropy
    )

    _APPLIED = True


class _RopeHalves(torch.autograd.Function):
    """``t * cos + rotate_half(t) * sin``, rotate_half([t1, t2]) = [-t2, t1], written half by half.

    Megatron's unfused form builds ``rotate_half`` with a negation and a ``cat`` (a full copy of q and k),
    and autograd's backward undoes both with another negation and ``cat``. The result is laid out head by
    head ([b, heads, s, dim] in memory, seen as [s, b, heads, dim]), so the attention kernel's contiguous
    copy of q and k (flanpipe.model.gpt) is free. Per half, one ``addcmul_`` adds the rotated product in
    place (no temporary, one pass less over q and k each way):
        out1 = t1 c1 - t2 s1                 d t1 = g1 c1 + g2 s2
        out2 = t2 c2 + t1 s2                 d t2 = g2 c2 - g1 s1
    The same products and sums as Megatron's; the CPU kernel may fuse a multiply-add (one rounding
    instead of two), so values and gradients agree to 1 ulp (4.8e-7 on unit-scale inputs), not bit for
    bit. Forward + backward of q or k [256, 8, 4, 32]: 1.9 vs 2.5 ms with a temporary (1 thread, 40 rounds
    interleaved, quiet machine).
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = t.shape[-1] // 2
        if t.dim() == 4:  # q or k as [s, b, heads, dim], stored head by head: what the attention kernel reads
            s, b, heads, dim = t.shape
            out = t.new_empty((b, heads, s, dim)).permute(2, 0, 1, 3)
        else:
            out = torch.empty_like(t)
        torch.mul(t, cos, out=out)
        out[..., :h].addcmul_(t[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(t[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        grad = g * cos
        grad[..., :h].addcmul_(g[..., h:], sin[..., h:])
        grad[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        return grad, None, None


def _rope_bshd_halves(original: Callable[..., Any]) -> Callable[..., Any]:
    """Megatron's unfused RoPE (``_apply_rotary_pos_emb_bshd``), bit for bit, without its copies.

    When the rotary dim is the whole head dim (every flanpipe model), the pass-through slice is
    empty and the final ``cat((t, t_pass))`` only copies ``t``; ``_RopeHalves`` also drops the
    rotation's own ``cat``. Other layouts (partial rotary, interleaved, MLA) go to ``original``.
    """

    def rope(
        t: torch.Tensor,
        freqs: torch.Tensor,
        rotary_interleaved: bool = False,
        multi_latent_attention: bool = False,
        mscale: float = 1.0,
    ) -> torch.Tensor:
        if rotary_interleaved or multi_latent_attention or freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2:
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        cos_ = (torch.cos(freqs) * mscale).to(t.dtype)
        sin_ = (torch.sin(freqs) * mscale).to(t.dtype)
        return _RopeHalves.apply(t, cos_, sin_)

    rope.original = original  # type: ignore[attr-defined]  # for the equality test
    return rope


class _RMSNorm(torch.autograd.Function):
    """``x * rstd * w``, rstd = 1 / sqrt(mean(x^2) + eps), with its gradient written out by hand.

    torch's RMSNorm has a fused CPU forward (``_fused_rms_norm``) but no CPU backward: autograd differentiates
    the composite (pow, mean, add, rsqrt, two products), ~15 elementwise passes over the activations. By
    hand, with xhat = x rstd and gw = g w:
        dw = sum over rows of g xhat
        dx = rstd (gw - xhat mean(gw xhat))
    six passes. Same forward values (the same fused kernel); gradients agree to float rounding (1.5e-7).
    Forward + backward of [256, 8, 256]: 7.3 vs 10.0 ms (1 thread, 60 rounds interleaved).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w, rstd = ctx.saved_tensors
        xhat = x * rstd
        gw = g * w
        dw = (g * xhat).reshape(-1, x.shape[-1]).sum(0)
        dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return dx, dw, None


class CpuRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm (same parameters and state dict) whose training pass goes through ``_RMSNorm``;
    no-grad passes (evaluation) and other dtypes keep torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.dtype != torch.float32 or self.weight is None:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNorm.apply(x, self.weight, eps)


def use_cpu_norms(model: torch.nn.Module) -> None:
    """Give every torch RMSNorm in ``model`` (Megatron's local spec builds them: ``WrappedTorchNorm``) the
    hand-written backward (``CpuRMSNorm``). A no-op without torch's fused CPU forward (torch < 2.9)."""
    if not hasattr(torch.ops.aten, "_fused_rms_norm"):
        return
    for module in model.modules():
        if type(module) is torch.nn.RMSNorm and len(module.normalized_shape) == 1:
            module.__class__ = CpuRMSNorm


class _SwiGLU(torch.autograd.Function):
    """``silu(a) * b`` for ``[a, b] = x.chunk(2, -1)``, its gradient written into one tensor.

    Megatron's unfused gated MLP computes ``silu(a) * (b + glu_linear_offset)`` (a copy of b to add
    0.0) and autograd joins the two halves' gradients with a ``cat``. Here the forward is the same
    two ops without the copy, and the backward writes each half's gradient in place with the very
    ops autograd uses (``silu_backward`` of g b for a, g silu(a) for b): bit for bit the same values.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        act = torch.nn.functional.silu(a)
        ctx.save_for_backward(a, b, act)
        return act * b

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        a, b, act = ctx.saved_tensors
        f = a.shape[-1]
        grad = g.new_empty((*g.shape[:-1], 2 * f))
        torch.ops.aten.silu_backward.grad_input(g * b, a, grad_input=grad[..., :f])
        torch.mul(g, act, out=grad[..., f:])
        return grad


def _swiglu_cpu(
    x: torch.Tensor, bias: torch.Tensor | None, fp8_input_store: bool = False, cpu_offload_input: bool = False
) -> torch.Tensor:
    """What Megatron's MLP calls for a gated SiLU under ``bias_activation_fusion`` (its
    ``bias_swiglu_impl``, a torch.compile kernel that needs a GPU or a C++ toolchain): the bias added
    as the unfused path adds it, then ``_SwiGLU``."""
    if fp8_input_store or cpu_offload_input:
        raise ValueError("the CPU SwiGLU keeps its input in the model's dtype (no fp8 store, no CPU offload)")
    return _SwiGLU.apply(x if bias is None else x + bias)


class _CrossEntropy(torch.autograd.Function):
    """Per-token cross entropy ``-log_softmax(logits)[target]`` whose backward writes the gradient in one go.

    autograd's ``F.cross_entropy`` backward first fills a zero tensor the size of the logits (nll_loss's
    gradient: -g at each target), then log_softmax's backward reads it back with the saved log-probs and
    reduces it per row. The gradient is ``g (softmax - onehot(target))``: one exp of the saved log-probs
    scaled by g, then -g added at each target. Same forward values; the gradient agrees to float rounding
    (3e-8 on 2,048 x 4,096 logits), 21.6 vs 26.2 ms CPU for forward + backward there (1 thread, 26 rounds
    interleaved, load 26).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logp, target)
        return -logp.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        logp, target = ctx.saved_tensors
        grad = torch.exp(logp).mul_(g[:, None])
        grad.scatter_add_(1, target[:, None], -g[:, None])
        return grad, None


def _plain_cross_entropy_at_tp1(original: Callable[..., Any]) -> Callable[..., Any]:
    """Megatron's ``vocab_parallel_cross_entropy``, by one log-softmax (``_CrossEntropy``) when the vocab
    is not split.

    At TP=1 each rank holds the whole vocabulary, so the per-token loss is the plain cross entropy:
    the same math in one log-softmax pass (equal to ~1e-7 relative, not bit for bit: the sums run
    in another order). fp32 logits without label smoothing only; anything else goes to ``original``.
    """
    from megatron.core import parallel_state

    def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        if (
            label_smoothing
            or logits.dtype != torch.float32
            or parallel_state.get_tensor_model_parallel_world_size() != 1
        ):
            return original(logits, target, label_smoothing)
        flat = _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return flat.view(target.shape)

    cross_entropy.original = original  # type: ignore[attr-defined]  # for the equality test
    return cross_entropy


def _tensor_cuda_is_identity(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with ``Tensor.cuda`` returning the tensor itself while it runs."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original  # type: ignore[method-assign]

    return wrapped


import_megatron()  # before any caller's first ``from megatron.core import ...``
