"""Plan a TP x PP x DP layout before asking a cluster for GPUs: memory, pipeline bubble, hours.

FLAN instruction-tunes LaMDA-PT 137B for 30k steps of 8,192-token batches with Adafactor. For a
given GPU count this enumerates every tensor/pipeline/data-parallel split Megatron-Core accepts,
estimates per-GPU memory and step time for each, marks the ones that cannot run, and recommends
one. Pure arithmetic (no torch): every formula is written out next to the code that computes it.

Precision assumed (Megatron's bf16 mixed precision, what a 137B run uses; flanpipe's CPU runs
train in fp32 instead):
    weights bf16 (2 B/param) + main grads fp32 (4 B, Megatron's DDP ``main_grad`` buffer, as
    flanpipe.train.loop's ``grad_reduce_in_fp32=True``) + fp32 master weights (4 B) + optimizer state.
Adafactor (FLAN's optimizer, torch.optim.Adafactor: no momentum) keeps for a [rows, cols]
matrix only a row vector and a column vector of second-moment statistics: 4 * (rows + cols)
bytes instead of Adam's 8 * rows * cols (two fp32 moments). For 137B that is ~0.1 GB vs ~1.1 TB,
so optimizer state is ~0 here and weights + grads + master = 10 B/param dominate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flanpipe.core.model_config import ModelConfig, flops_per_token, lookup_params, param_count

GIB = 2**30
RECOMPUTE_MODES = ("none", "selective")

ASSUMPTIONS = [
    "bf16 weights (2 B/param), fp32 main grads (4 B/param, Megatron DDP main_grad / grad_reduce_in_fp32), "
    "fp32 master weights (4 B/param): 10 B/param before optimizer state",
    "Adafactor state: factored second moment, 4*(rows+cols) B per weight matrix shard and 4 B per vector "
    "element; no first moment. Adam for comparison: 8 B/param (exp_avg + exp_avg_sq in fp32)",
    "TP shards every parameter (norms and row-parallel biases are replicated in reality: a few MB)",
    "activations: Korthikanti et al. 2022 per-layer bytes, bf16, sequence parallelism on (divided by TP); "
    "selective recompute drops the 5*a*s^2*b attention-core term",
    "1F1B: pipeline stage i holds min(PP - i, m) micro-batches in flight; the first stage is the worst; "
    "interleaved (VPP chunks of L/(PP*VPP) layers): min(2*(PP-i-1) + (VPP-1)*PP + 1, VPP*m) chunk micro-batches, "
    "bubble (PP-1)/(VPP*m + PP-1); offered where m is a multiple of PP (Megatron's requirement)",
    "step time = (model FLOPs + recompute FLOPs) / (gpus * peak * MFU) / (1 - bubble); "
    "TP/PP/DP communication is folded into MFU, not modelled",
    "model FLOPs = 6 * N * tokens + 12 * L * s * (heads * head_dim) * tokens (N excludes the input embedding "
    "lookup; attention counted over the full s x s mask although packed rows attend within segments)",
]


@dataclass(frozen=True)
class Hardware:
    """The cluster: how many GPUs, how big, how fast."""

    gpus: int
    """GPUs in the job; DP = gpus / (TP * PP)."""

    gpu_mem_gib: float = 80.0
    """Usable memory per GPU (H100 SXM: 80 GiB)."""

    gpus_per_node: int = 8
    """TP stays inside a node (NVLink); TP must divide this."""

    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989 TFLOP/s)."""

    mfu: float = 0.4
    """Fraction of peak achieved while a GPU computes (Megatron-LM reports 0.42-0.47 on H100)."""

    reserve_gib: float = 0.0
    """Memory set aside per GPU (CUDA context, NCCL buffers, allocator fragmentation)."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"need gpus >= 1 and gpus_per_node >= 1, got {self.gpus}, {self.gpus_per_node}")
        if not (0 < self.mfu <= 1) or self.peak_tflops <= 0 or self.gpu_mem_gib <= 0 or self.reserve_gib < 0:
            raise ValueError("need 0 < mfu <= 1, peak_tflops > 0, gpu_mem_gib > 0, reserve_gib >= 0")


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes, and how many steps."""

    batch_tokens: int = 8192
    """Packed tokens per optimizer step (FLAN: 8,192)."""

    seq_length: int = 1024
    """Tokens per packed row."""

    steps: int = 30_000
    """Optimizer steps (FLAN: 30k)."""

    distributed_optimizer: bool = False
    """ZeRO-1: shard fp32 master weights and optimizer state over DP (flanpipe.train.loop does not)."""

    def __post_init__(self) -> None:
        if min(self.batch_tokens, self.seq_length, self.steps) < 1:
            raise ValueError("batch_tokens, seq_length and steps must be >= 1")


@dataclass(frozen=True)
class Layout:
    """One way to run the job: world = TP x PP x DP, plus micro-batch and recompute choices."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str = "none"
    vpp: int = 1
    """Model chunks per PP rank (Megatron's interleaved 1F1B when > 1)."""


# ---------------------------------------------------------------------------------------------
# Batch arithmetic


def global_batch_rows(batch_tokens: int, seq_length: int) -> int:
    """Packed rows per step. FLAN counts its batch in packed tokens, so it must be whole rows.

    8192 / 1024 = 8 rows; 8192 / 1280 = 6.4 rows is an error rather than a silent rounding that
    would change the number of tokens per step.
    """
    if batch_tokens % seq_length:
        rows = batch_tokens / seq_length
        lo, hi = batch_tokens // seq_length, batch_tokens // seq_length + 1
        raise ValueError(
            f"batch of {batch_tokens} tokens / {seq_length} tokens per packed row = {rows:g} rows: the batch is "
            f"counted in packed tokens and must be a whole number of rows; use --batch-tokens "
            f"{lo * seq_length} ({lo} x {seq_length}) or {hi * seq_length} ({hi} x {seq_length}), "
            f"or a --seq-length that divides {batch_tokens}"
        )
    return batch_tokens // seq_length


def num_microbatches(rows: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per rank per step: m = global rows / (micro batch * DP)."""
    per_pass = micro_batch_size * dp
    if rows % per_pass:
        raise ValueError(f"global batch of {rows} rows does not split into micro-batches of {micro_batch_size} x {dp}")
    return rows // per_pass


def bubble_fraction(pp: int, m: int, vpp: int = 1) -> float:
    """Idle fraction of a 1F1B step: (PP - 1) / (VPP x m + PP - 1).

    Each stage does m forward+backward slots of useful work but waits PP - 1 slots while the
    pipeline fills and drains, e.g. PP=4, m=8: 3 / 11 = 27% idle. Interleaving (VPP chunks per
    rank) makes each slot VPP times shorter while the fill/drain stays PP - 1 of the short slots
    (Narayanan et al. 2021): PP=4, m=8, VPP=2: 3 / 19 = 16%.
    """
    if pp < 1 or m < 1 or vpp < 1:
        raise ValueError(f"need pp >= 1, m >= 1 and vpp >= 1, got {pp}, {m}, {vpp}")
    return (pp - 1) / (vpp * m + pp - 1)


# ---------------------------------------------------------------------------------------------
# Parameters


def attention_width(cfg: ModelConfig) -> int:
    """heads x head dim: the width of Q, K, V and of the projection's input."""
    return cfg.num_attention_heads * cfg.kv_channels


def per_layer_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer layer, read off flanpipe.core.model_config.param_count (2 layers - 1 layer)."""
    two = param_count(dataclasses.replace(cfg, num_layers=2))
    one = param_count(dataclasses.replace(cfg, num_layers=1))
    return two - one


def first_stage_extra_params(cfg: ModelConfig) -> int:
    """Token embedding V x h, plus a learned position table P x h (rope has none)."""
    return lookup_params(cfg)


def last_stage_extra_params(cfg: ModelConfig) -> int:
    """Final norm + untied output layer V x h: whatever param_count has beyond layers and embedding."""
    return param_count(cfg) - cfg.num_layers * per_layer_params(cfg) - first_stage_extra_params(cfg)


def stage_params(cfg: ModelConfig, pp: int, stage: int) -> int:
    """Unsharded parameters of pipeline stage ``stage`` (0-based) of ``pp``: L / PP layers + ends."""
    n = (cfg.num_layers // pp) * per_layer_params(cfg)
    if stage == 0:
        n += first_stage_extra_params(cfg)
    if stage == pp - 1:
        n += last_stage_extra_params(cfg)
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """N for 6*N*tokens: every parameter except lookup tables (embedding, positions), which cost no FLOPs."""
    return param_count(cfg) - lookup_params(cfg)


def _norm_elements(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size if cfg.normalization == "LayerNorm" else cfg.hidden_size


def adafactor_state_elements(cfg: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """fp32 Adafactor statistics held by one GPU of ``stage``: rows + cols per matrix shard.

    Shards under TP (column-parallel splits rows, row-parallel splits cols), d = heads * head_dim,
    g = 2 for a gated MLP:
        qkv [3d/t, h]  proj [h, d/t]  fc1 [g*f/t, h]  fc2 [h, f/t]  embedding/output [V/t, h]
    Vectors (biases, norm gains) keep a full second moment: one element each.
    """
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, attention_width(cfg)
    g = 2 if cfg.gated_linear_unit else 1
    matrices = (3 * d // tp + h) + (h + d // tp) + (g * f // tp + h) + (h + f // tp)
    vectors = 3 * d // tp + h + g * f // tp + h + 2 * _norm_elements(cfg)
    n = (cfg.num_layers // pp) * (matrices + vectors)
    if stage == 0:
        n += v // tp + h
        if cfg.position_embedding_type != "rope":
            n += cfg.max_position_embeddings + h
    if stage == pp - 1:
        n += v // tp + h + _norm_elements(cfg)
    return n


# ---------------------------------------------------------------------------------------------
# Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models")


def activation_bytes_per_layer(
    s: int, b: int, h: int, a: int, d: int, f: int, *, gated: bool = False, recompute: str = "none"
) -> int:
    """Bytes one transformer layer keeps for backward, per micro-batch, before TP division (bf16).

    Standard GPT (d = h, f = 4h, no GLU), the paper's formula:  s*b*h*(34 + 5*a*s/h)  =
        attention 11sbh + 5as^2b: LN-out 2sbh, Q,K 4sbh, V 2sbh, proj input 2sbh, dropout mask sbh,
                                  softmax 2as^2b, its dropout mask as^2b, dropout output 2as^2b
        MLP       19sbh:          fc1 input 2sbh, GELU input 8sbh, fc2 input 8sbh, dropout mask sbh
        LayerNorm inputs 4sbh
    Written for any attention width d (= heads x head dim) and MLP width f:
        sb*(10h + 8d + c*f) + 5as^2b,   c = 4 (GELU input + fc2 input, 2 B each)
                                        c = 8 (GLU: both branches, act(x1) and the product)
    With d = h, f = 4h, c = 4: 10 + 8 + 16 = 34. Selective recompute re-runs the attention core
    (QK^T, softmax, dropout) in backward and drops the 5as^2b term.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    c = 8 if gated else 4
    linear = s * b * (10 * h + 8 * d + c * f)
    core = 5 * a * s * s * b if recompute == "none" else 0
    return linear + core


def logits_bytes(s: int, b: int, h: int, v: int) -> int:
    """Last stage extras per micro-batch: final-norm input + output-layer input (bf16, 2sbh each)
    and the fp32 logits the cross entropy keeps (4sbV)."""
    return 4 * s * b * h + 4 * s * b * v


def in_flight_microbatches(pp: int, m: int, stage: int) -> int:
    """1F1B warm-up: stage i runs PP - i forwards before its first backward, so it holds
    min(PP - i, m) micro-batches of activations; stage 0 holds the most."""
    return min(pp - stage, m)


def in_flight_chunks(pp: int, m: int, stage: int, vpp: int) -> int:
    """Interleaved warm-up (Megatron's schedule): rank i runs 2 (PP - i - 1) + (VPP - 1) PP forwards of
    one-chunk micro-batches before its first backward, + 1 in flight, at most VPP x m. Each chunk is
    L / (PP x VPP) layers, so rank 0 holds 1 + (PP - 1) / (PP x VPP) times the 1F1B activations
    (PP=4, VPP=2: 11 chunks of L/8 layers = 1.375 x 4 micro-batches of L/4)."""
    return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, vpp * m)


# ---------------------------------------------------------------------------------------------
# Memory per GPU


def stage_memory_bytes(
    cfg: ModelConfig, layout: Layout, stage: int, *, seq_length: int, m: int, distributed_optimizer: bool = False
) -> dict[str, int]:
    """Per-GPU bytes of pipeline stage ``stage`` under ``layout``, by component."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    n = stage_params(cfg, pp, stage) // tp
    zero = dp if distributed_optimizer else 1  # ZeRO-1 shards master weights + optimizer state over DP
    per_layer = activation_bytes_per_layer(
        seq_length,
        layout.micro_batch_size,
        cfg.hidden_size,
        cfg.num_attention_heads,
        attention_width(cfg),
        cfg.ffn_hidden_size,
        gated=cfg.gated_linear_unit,
        recompute=layout.recompute,
    )
    if layout.vpp > 1:
        layers, held = cfg.num_layers // (pp * layout.vpp), in_flight_chunks(pp, m, stage, layout.vpp)
    else:
        layers, held = cfg.num_layers // pp, in_flight_microbatches(pp, m, stage)
    activations = per_layer // tp * layers * held
    logits = (
        logits_bytes(seq_length, layout.micro_batch_size, cfg.hidden_size, cfg.vocab_size) // tp
        if stage == pp - 1
        else 0
    )
    return {
        "weights": 2 * n,
        "grads": 4 * n,
        "master_weights": 4 * n // zero,
        "optimizer_state": 4 * adafactor_state_elements(cfg, tp, pp, stage) // zero,
        "activations": activations,
        "logits": logits,
    }


# ---------------------------------------------------------------------------------------------
# FLOPs and time


def model_flops_per_step(cfg: ModelConfig, tokens: int, seq_length: int) -> int:
    """flanpipe.core.model_config.flops_per_token (6 N + 12 L s d, what training logs as MFU) x tokens."""
    return flops_per_token(cfg, seq_length) * tokens


def recompute_flops_per_step(cfg: ModelConfig, tokens: int, seq_length: int, recompute: str) -> int:
    """Selective recompute re-runs the attention core forward: 4 * L * s * d per token."""
    if recompute == "none":
        return 0
    return 4 * cfg.num_layers * seq_length * attention_width(cfg) * tokens


def step_time_s(flops: float, gpus: int, peak_tflops: float, mfu: float, bubble: float) -> float:
    """Seconds per step: the work spread over all GPUs at MFU, stretched by the idle bubble.

    e.g. 6.86e15 FLOPs on 128 GPUs x 989 TFLOP/s x 0.4 = 0.136 s, / (1 - 0.6) = 0.339 s.
    """
    return flops / (gpus * peak_tflops * 1e12 * mfu) / (1.0 - bubble)


def forward_hours(cfg: ModelConfig, tokens: int, seq_length: int, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Hours to run ``tokens`` through the model forward only (evaluation: no backward pass, no optimizer).

    flops_per_token counts forward + backward = 3 x forward (6 N = 2 N forward + 4 N backward), so the forward
    alone is a third: e.g. 137B at 1,280 tokens, 1e9 tokens on 8 GPUs x 989 TFLOP/s x 0.4:
    8.4e11 / 3 x 1e9 = 2.8e20 FLOPs / 3.2e15 FLOP/s = 8.8e4 s = 24.6 h.
    """
    return model_flops_per_step(cfg, tokens, seq_length) / 3 / (gpus * peak_tflops * 1e12 * mfu) / 3600


# ---------------------------------------------------------------------------------------------
# Enumeration and recommendation


VPP_CHOICES = (2, 4)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _fits(cfg: ModelConfig, tp: int, pp: int) -> bool:
    try:
        cfg.check_parallel(tp, pp)
    except ValueError:
        return False
    return True


def enumerate_layouts(cfg: ModelConfig, hw: Hardware, rows: int) -> list[Layout]:
    """Every split Megatron accepts: TP | gpus_per_node and heads/ffn/vocab, PP | layers,
    DP = gpus / (TP * PP); micro-batch sizes dividing rows / DP; recompute none or selective.

    A DP that does not divide the batch still yields one (infeasible) layout so the plan says why.
    """
    layouts = []
    per_node = ranks_per_node(hw.gpus, hw.gpus_per_node)
    for tp in _divisors(min(hw.gpus_per_node, hw.gpus)):
        if hw.gpus_per_node % tp or per_node % tp:  # a TP group never crosses a node
            continue
        for pp in _divisors(cfg.num_layers):
            if hw.gpus % (tp * pp) or not _fits(cfg, tp, pp):
                continue
            dp = hw.gpus // (tp * pp)
            micro = _divisors(rows // dp) if rows % dp == 0 else [1]
            layouts += [Layout(tp, pp, dp, mb, r) for mb in micro for r in RECOMPUTE_MODES]
            # interleaving: 2 or 4 chunks per rank where the layers split and m is a multiple of PP
            layouts += [
                Layout(tp, pp, dp, mb, r, vpp)
                for vpp in VPP_CHOICES
                if pp > 1 and cfg.num_layers % (pp * vpp) == 0 and rows % dp == 0
                for mb in micro
                if (rows // (dp * mb)) % pp == 0
                for r in RECOMPUTE_MODES
            ]
    return layouts


def evaluate_layout(cfg: ModelConfig, hw: Hardware, wl: Workload, layout: Layout) -> dict[str, Any]:
    """One candidate: memory of its worst stage, bubble, step time, hours, and why it cannot run."""
    rows = global_batch_rows(wl.batch_tokens, wl.seq_length)
    out: dict[str, Any] = dataclasses.asdict(layout)
    if rows % (layout.micro_batch_size * layout.dp):
        out.update(
            num_microbatches=None,
            feasible=False,
            reasons=[
                f"global batch of {rows} rows does not split over DP={layout.dp} "
                f"({rows} / {layout.dp} = {rows / layout.dp:g} rows per rank)"
            ],
        )
        return out
    m = num_microbatches(rows, layout.micro_batch_size, layout.dp)
    stages = {
        s: stage_memory_bytes(
            cfg, layout, s, seq_length=wl.seq_length, m=m, distributed_optimizer=wl.distributed_optimizer
        )
        for s in sorted({0, layout.pp - 1})
    }
    worst = max(stages, key=lambda s: sum(stages[s].values()))
    mem = stages[worst]
    total = sum(mem.values()) + hw.reserve_gib * GIB
    n_gpu = stage_params(cfg, layout.pp, worst) // layout.tp
    tokens = rows * wl.seq_length
    flops = model_flops_per_step(cfg, tokens, wl.seq_length)
    extra = recompute_flops_per_step(cfg, tokens, wl.seq_length, layout.recompute)
    bubble = bubble_fraction(layout.pp, m, layout.vpp)
    t = step_time_s(flops + extra, hw.gpus, hw.peak_tflops, hw.mfu, bubble)
    reasons = []
    if total > hw.gpu_mem_gib * GIB:
        reasons.append(f"needs {total / GIB:.1f} GiB per GPU > {hw.gpu_mem_gib:g} GiB")
    out.update(
        num_microbatches=m,
        worst_stage=worst,
        params_per_gpu=n_gpu,
        memory_gib={k: v / GIB for k, v in mem.items()} | {"reserve": hw.reserve_gib, "total": total / GIB},
        adam_state_gib=8 * n_gpu / (layout.dp if wl.distributed_optimizer else 1) / GIB,
        bubble_fraction=bubble,
        model_flops_per_step=flops,
        recompute_flops_per_step=extra,
        step_time_s=t,
        tokens_per_s=tokens / t,
        effective_mfu=flops / (t * hw.gpus * hw.peak_tflops * 1e12),
        total_hours=wl.steps * t / 3600,
        feasible=not reasons,
        reasons=reasons,
    )
    return out


def recommend(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fastest feasible step; ties go to fewer model-parallel GPUs (TP*PP), then smaller TP
    (TP traffic is per layer, PP traffic per stage), no recompute, smaller micro-batch."""
    feasible = [c for c in candidates if c["feasible"]]
    if not feasible:
        return None
    return min(
        feasible,
        key=lambda c: (
            round(c["step_time_s"], 9),
            c["tp"] * c["pp"],
            c["tp"],
            c["vpp"],  # interleaving costs VPP x the p2p messages: only when it is faster
            c["recompute"] != "none",
            c["micro_batch_size"],
            c["memory_gib"]["total"],
        ),
    )


def plan(cfg: ModelConfig, hw: Hardware, wl: Workload, *, model_name: str = "") -> dict[str, Any]:
    """The whole plan as a JSON-ready dict: inputs, model facts, every candidate, the recommendation."""
    rows = global_batch_rows(wl.batch_tokens, wl.seq_length)
    if wl.seq_length > cfg.max_position_embeddings:
        raise ValueError(f"seq_length={wl.seq_length} > max_position_embeddings={cfg.max_position_embeddings}")
    candidates = [evaluate_layout(cfg, hw, wl, lay) for lay in enumerate_layouts(cfg, hw, rows)]
    if not candidates:
        raise ValueError(
            f"no TP x PP split of {cfg.num_layers} layers / {cfg.num_attention_heads} heads divides {hw.gpus} GPUs"
        )
    best = recommend(candidates)
    slurm = slurm_resources(hw.gpus, hw.gpus_per_node, best["tp"] if best else 1)
    n = param_count(cfg)
    notes = [
        f"global batch = {wl.batch_tokens} tokens / {wl.seq_length} = {rows} packed rows: DP can be at most {rows}, "
        f"so at least {-(-hw.gpus // rows)} GPUs per model replica (TP*PP)",
        f"Adafactor state for the whole model: {4 * adafactor_state_elements(cfg, 1, 1, 0) / GIB:.2f} GiB; "
        f"Adam's would be {8 * n / GIB:.0f} GiB",
    ]
    if best is None:
        notes.append("no feasible layout: add GPUs, use --distributed-optimizer, or more GPU memory")
    return {
        "model": {
            "name": model_name,
            "params": n,
            "matmul_params": matmul_params(cfg),
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "kv_channels": cfg.kv_channels,
            "ffn_hidden_size": cfg.ffn_hidden_size,
            "vocab_size": cfg.vocab_size,
        },
        "hardware": dataclasses.asdict(hw),
        "workload": dataclasses.asdict(wl) | {"global_batch_rows": rows},
        "assumptions": ASSUMPTIONS,
        "notes": notes,
        "candidates": candidates,
        "recommended": best,
        "slurm": slurm,
    }


def format_plan(p: dict[str, Any], top: int = 10) -> str:
    """A short human table: the recommendation and the fastest feasible candidates."""
    m, wl = p["model"], p["workload"]
    lines = [
        f"{m['name'] or 'model'}: {m['params'] / 1e9:.2f}B params; {p['hardware']['gpus']} GPUs x "
        f"{p['hardware']['gpu_mem_gib']:g} GiB; {wl['batch_tokens']} tokens/step = {wl['global_batch_rows']} rows "
        f"x {wl['seq_length']}; {wl['steps']} steps",
        f"{'TP':>3} {'PP':>3} {'VPP':>3} {'DP':>3} {'mb':>3} {'m':>3} {'recompute':>9} {'mem GiB':>8} {'bubble':>7} "
        f"{'step s':>8} {'hours':>8}",
    ]
    feasible = sorted((c for c in p["candidates"] if c["feasible"]), key=lambda c: c["step_time_s"])
    for c in feasible[:top]:
        lines.append(
            f"{c['tp']:>3} {c['pp']:>3} {c['vpp']:>3} {c['dp']:>3} {c['micro_batch_size']:>3} "
            f"{c['num_microbatches']:>3} "
            f"{c['recompute']:>9} {c['memory_gib']['total']:>8.1f} {c['bubble_fraction']:>7.3f} "
            f"{c['step_time_s']:>8.3f} {c['total_hours']:>8.2f}"
        )
    n_bad = sum(not c["feasible"] for c in p["candidates"])
    lines.append(f"{len(feasible)} feasible, {n_bad} infeasible of {len(p['candidates'])} candidates")
    r = p["recommended"]
    if r is None:
        lines.append("recommended: none")
    else:
        lines.append(
            f"recommended: TP={r['tp']} PP={r['pp']} VPP={r['vpp']} DP={r['dp']} micro-batch={r['micro_batch_size']} "
            f"recompute={r['recompute']}: {r['memory_gib']['total']:.1f} GiB/GPU, bubble {r['bubble_fraction']:.3f}, "
            f"{r['step_time_s']:.3f} s/step, {r['total_hours']:.2f} h"
        )
    sl = p["slurm"]
    lines.append(
        f"profiles/slurm, set-resources train: nodes: {sl['nodes']}, tasks: {sl['tasks']}, gpu: {sl['gpu']} "
        f"({sl['ranks_per_node']} ranks per node)"
    )
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- nodes (SLURM: profiles/slurm)


def node_split(tasks: int, nodes: int, tp: int = 1) -> int:
    """Ranks per node when ``tasks`` ranks run on ``nodes`` nodes; ValueError unless they fill the nodes
    evenly and every node holds whole tensor-parallel groups.

    srun places a job's ranks in blocks (ranks 0..k-1 on the first node, k..2k-1 on the next) and Megatron
    makes each TP group of consecutive ranks, so k = tasks / nodes being a multiple of TP keeps every TP
    all-reduce inside one node (NVLink, not the network). Uneven nodes would leave GPUs idle on some, or
    ask more ranks of a node than it has GPUs. E.g. 16 tasks on 2 nodes at TP 8: 8 per node, one TP group
    each; 12 tasks on 2 nodes at TP 4: 6 per node, and the second group straddles both: refused.
    """
    if tasks < 1 or nodes < 1:
        raise ValueError(f"need tasks >= 1 and nodes >= 1, got tasks={tasks}, nodes={nodes}")
    if tasks % nodes:
        fits = sorted({nodes * (tasks // nodes), nodes * (tasks // nodes + 1)} - {0})
        raise ValueError(
            f"{tasks} ranks do not fill {nodes} nodes evenly: tasks must be a multiple of nodes "
            f"(e.g. tasks {' or '.join(map(str, fits))}, or nodes dividing {tasks})"
        )
    per = tasks // nodes
    if per % tp:
        raise ValueError(
            f"{per} ranks per node ({tasks} tasks / {nodes} nodes) split a tensor-parallel group of {tp} "
            "across nodes: ranks per node must be a multiple of TP"
        )
    return per


def ranks_per_node(gpus: int, gpus_per_node: int) -> int:
    """Ranks per node on as few nodes as hold ``gpus`` ranks (ceil(gpus / gpus_per_node) nodes), spread evenly."""
    return node_split(gpus, -(-gpus // gpus_per_node))


def slurm_resources(gpus: int, gpus_per_node: int, tp: int = 1) -> dict[str, int]:
    """The train rule's set-resources in profiles/slurm for ``gpus`` ranks (one per GPU) on nodes of
    ``gpus_per_node`` GPUs: ``nodes``, ``tasks`` and ``gpu`` (the DAG checks the same arithmetic,
    flanpipe.plan.config.check_nodes), plus the ranks per node they imply."""
    nodes = -(-gpus // gpus_per_node)
    per = node_split(gpus, nodes, tp)
    return {"nodes": nodes, "tasks": gpus, "gpu": gpus, "ranks_per_node": per}


# ---------------------------------------------------------------- evaluation (flanpipe.eval.inference)


def eval_memory_bytes(cfg: ModelConfig, tp: int, pp: int, *, batch: int, seq_length: int) -> dict[str, int]:
    """Per-GPU bytes of evaluation at TP x PP (bf16 weights, no grads or optimizer), worst stage.

    weights   = stage params / TP x 2 B
    kv_cache  = 2 (K and V) x L/PP layers x batch x seq x (heads x head_dim) / TP x 2 B
                (StaticInferenceContext allocates the whole [seq, batch] buffer up front)
    logits    = batch x seq x V x 4 B on the last stage: rank classification's full forward gathers
                fp32 logits over the whole vocabulary (runtime_gather_output)
    activation= batch x seq x max(3 x heads x head_dim, (1 + gated) x ffn) / TP x 2 B: one layer's
                widest intermediate (nothing is kept for a backward pass)
    """
    per_stage = max(stage_params(cfg, pp, s) for s in range(pp))
    layers = cfg.num_layers // pp
    d = attention_width(cfg)
    kv = 2 * layers * batch * seq_length * d // tp * 2
    widest = max(3 * d, (1 + int(cfg.gated_linear_unit)) * cfg.ffn_hidden_size)
    out = {
        "weights": per_stage // tp * 2,
        "kv_cache": kv,
        "logits": batch * seq_length * cfg.vocab_size * 4,
        "activations": batch * seq_length * widest // tp * 2,
    }
    out["total"] = sum(out.values())
    return out


def plan_eval(
    cfg: ModelConfig, *, gpu_mem_gib: float, gpus_per_node: int = 8, batch: int = 32, seq_length: int = 1280
) -> dict[str, Any]:
    """The smallest TP x PP (TP within a node, then fewest GPUs, then lowest PP) whose evaluation fits.

    Evaluation has no gradients or optimizer state, so it fits on far fewer GPUs than training; the
    remaining GPUs are best spent as data-parallel replicas (more evaluation tasks).
    """
    fits = []
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(cfg.num_layers):
            if not _fits(cfg, tp, pp):
                continue
            mem = eval_memory_bytes(cfg, tp, pp, batch=batch, seq_length=seq_length)
            if mem["total"] <= gpu_mem_gib * GIB:
                fits.append((tp * pp, pp, tp, mem))
    if not fits:
        return {"fits": False, "batch": batch, "seq_length": seq_length}
    gpus, pp, tp, mem = min(fits, key=lambda f: f[:3])
    return {"fits": True, "tp": tp, "pp": pp, "gpus": gpus, "batch": batch, "seq_length": seq_length,
            "memory_gib": {k: v / GIB for k, v in mem.items()}}  # fmt: skip
