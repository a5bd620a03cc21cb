"""The ``train`` block of a run spec and the batch arithmetic that splits it over ranks, in plain Python.

The config checks (``flanpipe.plan.config``, at DAG build time) and the training entry point
(``flanpipe.train.loop``, once torchrun says how many ranks there are) check the same arithmetic with the
same function, ``split_batch``; neither imports torch for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from flanpipe.core.model_config import ModelConfig

PRECISIONS = ("fp32", "bf16")
ADAFACTOR_DEFAULTS = {"scale_parameter": True, "relative_step": True}
"""Adafactor's switches (flanpipe.train.optim.Adafactor); both on is torch.optim.Adafactor's behaviour."""


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` block of train_spec.json."""

    steps: int
    """Optimizer steps."""

    lr: float
    """Peak learning rate (Adafactor: relative to parameter scale, see flanpipe.train.optim)."""

    micro_batch_size: int
    """Packed rows per forward pass on one rank."""

    global_batch_size: int
    """Packed rows per optimizer step = micro_batch_size x DP size x accumulation steps."""

    seq_length: int
    """Tokens per packed row; must equal the packed data's row length."""

    warmup_steps: int = 0
    """Linear warmup steps before the constant lr."""

    seed: int = 1234
    """Seeds weight init, Megatron's RNG tracker and the row shuffle."""

    log_interval: int = 10
    """Log every this many steps (the first and last steps are always logged)."""

    tensor_model_parallel_size: int = 1
    """TP: each layer's matrices split over this many ranks."""

    pipeline_model_parallel_size: int = 1
    """PP: layers split into this many stages (1F1B schedule)."""

    virtual_pipeline_model_parallel_size: int = 1
    """Model chunks per PP rank (> 1: Megatron's interleaved 1F1B). Each rank holds ``vpp`` chunks of
    num_layers / (pp x vpp) layers, round-robin over the ranks, which cuts the pipeline bubble from
    (pp - 1) / m to (pp - 1) / (vpp x m) for m micro-batches, at vpp x the p2p traffic. Needs the
    micro-batches per step to be a multiple of pp."""

    precision: str = "fp32"
    """fp32, or bf16: bf16 parameters and activations, fp32 master weights in the optimizer and fp32
    gradient reduction (Megatron's mixed precision; what a GPU run uses)."""

    optimizer: str = "adafactor"
    """adafactor (FLAN) or adam (AdamW)."""

    adafactor: dict[str, bool] = field(default_factory=lambda: dict(ADAFACTOR_DEFAULTS))
    """Adafactor's switches, missing ones at their default: ``scale_parameter`` (step relative to the
    parameter's RMS) and ``relative_step`` (lr capped at 1/sqrt(t)); see flanpipe.train.optim."""

    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (not biases / norms)."""

    clip_grad: float = 1.0
    """Clip by global grad norm; 0 disables."""

    init_checkpoint: str | None = None
    """Optional run directory (model.json + checkpoint/) whose weights start training,
    e.g. a pretrained LM to instruction-tune. Its model config must equal this run's."""

    save_interval: int = 0
    """Save a resumable checkpoint every this many steps; 0: only at the end and on SIGTERM."""

    keep_checkpoints: int = 2
    """Resumable checkpoints kept in the checkpoint dir (the newest ones)."""

    tensorboard: bool = True
    """Write TensorBoard event files to out/tensorboard (rank 0)."""

    peak_tflops: float = 989.0
    """Peak dense TFLOP/s of one device, the MFU denominator (H100 SXM bf16: 989). Meaningless
    on CPU, where the logged MFU is only an estimate against this number."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "micro_batch_size",
            "global_batch_size",
            "seq_length",
            "log_interval",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("train.warmup_steps must be >= 0")
        if self.save_interval < 0:
            raise ValueError("train.save_interval must be >= 0")
        if not self.peak_tflops > 0:
            raise ValueError("train.peak_tflops must be > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.virtual_pipeline_model_parallel_size < 1:
            raise ValueError("train.virtual_pipeline_model_parallel_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        unknown = sorted(set(self.adafactor) - set(ADAFACTOR_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown train.adafactor keys: {unknown} (known: {sorted(ADAFACTOR_DEFAULTS)})")
        if not all(isinstance(v, bool) for v in self.adafactor.values()):
            raise ValueError(f"train.adafactor switches must be true or false, got {self.adafactor}")
        object.__setattr__(self, "adafactor", {**ADAFACTOR_DEFAULTS, **self.adafactor})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - set(spec_keys()))
        if unknown:
            raise ValueError(f"unknown train spec keys: {unknown}")
        return cls(**data)


def spec_keys() -> tuple[str, ...]:
    """Every key a ``train`` block may hold: TrainConfig's fields, nothing written out twice."""
    return tuple(f.name for f in fields(TrainConfig))


# How a run is carried out, not what it computes: the log, save and retention cadence, the MFU denominator,
# and how each step is split over ranks (micro-batch, TP/PP/VPP layout). The run spec leaves them out and
# they reach training through ``--ops`` (flanpipe.core.rerun.Operational), so changing one retrains nothing.
# The split changes floating-point summation order only: the same steps up to fp32 rounding, so a rerun for
# another reason may write slightly different weights (ARCH.md's contract table says so). tensorboard
# toggles the event files beside the model, never the model.
OPERATIONAL = frozenset(
    {
        "log_interval",
        "save_interval",
        "keep_checkpoints",
        "tensorboard",
        "peak_tflops",
        "micro_batch_size",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
    }
)


def fact_keys() -> tuple[str, ...]:
    """The keys of a run spec's ``train`` block: what changes the weights (TrainConfig minus OPERATIONAL)."""
    return tuple(k for k in spec_keys() if k not in OPERATIONAL)


# Spec keys left out of a run's fingerprint: they do not make it another run. A checkpoint stays this run's
# when only they differ: more steps continue a finished run; the operational keys change nothing computed
# (up to fp32 rounding) - and a layout change is then refused with a clear error by ``check_layout``
# (optimizer state does not reshard) instead of silently starting over.
NOT_FINGERPRINTED = OPERATIONAL | {"steps"}


# Train keys added after checkpoints were first written: hashed only when set off their default, so
# that a checkpoint saved before the key existed still fingerprints as the same run.
HASHED_WHEN_SET = {"adafactor": ADAFACTOR_DEFAULTS}


def fingerprint_parts(
    model: dict[str, Any],
    train: dict[str, Any],
    *,
    data: str,
    tokenizer: str | None = None,
    init: str | None = None,
    code: int | None = None,
) -> dict[str, str]:
    """What makes a run this run, one digest each: the spec (model config and the trajectory-relevant train
    keys), the packed data's content, the tokenizer that made it, the initial weights and training's code
    version. A resume must agree on all of them (``fingerprint``); naming the parts lets a fresh start say
    which one changed.

    Pass the parsed configs (defaults filled in), so that a spec spelling out a default and one leaving it
    out hash the same.
    """
    from flanpipe.core.rerun import digest_json

    train = {
        k: v
        for k, v in train.items()
        if k not in NOT_FINGERPRINTED and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])
    }
    return {
        "spec": digest_json({"model": model, "train": train}),
        "data": data,
        "tokenizer": tokenizer or "",
        "init": init or "",
        "code": str(code or ""),
    }


def fingerprint(parts: dict[str, str]) -> str:
    """One hash of ``fingerprint_parts``: the resume check compares it with the checkpoint's."""
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_parts(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Which fingerprint parts differ (all of them when the checkpoint recorded none)."""
    if not old:
        return sorted(new)
    return sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))


@dataclass(frozen=True)
class RankGrid:
    """How the world's ranks split: world = TP x PP x DP, and the micro-batches each rank runs per step.

    (Not ``flanpipe.train.planner.Layout``, which is one candidate job shape the planner scores.)
    """

    world: int
    tp: int
    pp: int
    dp: int
    accumulation: int
    """Micro-batches per rank per step = global_batch / (micro_batch x dp)."""
    vpp: int = 1
    """Model chunks per PP rank (interleaved schedule when > 1)."""


class BatchSplitError(ValueError):
    """The world or the batch does not split; ``key`` is the config key to blame (None: the world)."""

    def __init__(self, key: str | None, detail: str):
        super().__init__(f"{key}: {detail}" if key else detail)
        self.key = key


def split_batch(
    *,
    world: int,
    tp: int,
    pp: int,
    vpp: int,
    micro_batch_size: int,
    global_batch_size: int,
    source: str = "training ranks",
) -> RankGrid:
    """Split ``world`` ranks into TP x PP x DP and the global batch into micro-batches, or raise.

    Batch arithmetic, nanoGPT style:
        world = TP x PP x DP                            so DP = world / (TP x PP)
        global_batch = micro_batch x DP x accumulation  so accumulation = global / (micro x DP)
    e.g. world 8 at TP 2 x PP 2: DP = 8 / 4 = 2; global 8 rows, micro 2: accumulation = 8 / (2 x 2) = 2.
    ``source`` says where ``world`` came from, for the message.
    """
    if world < 1 or world % (tp * pp):
        raise BatchSplitError(
            None,
            f"world size {world} ({source}) is not a multiple of train.tensor_model_parallel_size x "
            f"train.pipeline_model_parallel_size = {tp} x {pp} = {tp * pp} "
            f"({world} % {tp * pp} = {world % (tp * pp)}); world = TP x PP x DP",
        )
    dp = world // (tp * pp)
    micro, glob = micro_batch_size, global_batch_size
    if glob % (micro * dp):
        raise BatchSplitError(
            "train.global_batch_size",
            f"{glob} is not a multiple of train.micro_batch_size x DP = {micro} x {dp} = {micro * dp} "
            f"({glob} % {micro * dp} = {glob % (micro * dp)}), where DP = world / (TP x PP) = {world} / "
            f"({tp} x {pp}) = {dp} with world {world} from {source}; the global batch must be a multiple "
            "of micro_batch_size x dp (the rows one forward pass covers on all DP ranks)",
        )
    m = glob // (micro * dp)
    if vpp > 1 and m % pp:
        # Megatron's interleaved schedule runs micro-batches in groups of pp per model chunk
        raise BatchSplitError(
            "train.virtual_pipeline_model_parallel_size",
            f"the interleaved schedule needs the micro-batches per step ({m} = global / (micro x DP) = "
            f"{glob} / ({micro} x {dp}) = {m}, world {world} from {source}) to be a multiple of "
            f"pipeline_model_parallel_size={pp}: it runs them in groups of PP = {pp} per model chunk",
        )
    assert glob == micro * dp * m
    return RankGrid(world=world, tp=tp, pp=pp, dp=dp, accumulation=m, vpp=vpp)


def plan_layout(train: TrainConfig, model: ModelConfig, world: int, source: str = "training ranks") -> RankGrid:
    """Check the model split and the batch arithmetic before any process group exists."""
    tp, pp = train.tensor_model_parallel_size, train.pipeline_model_parallel_size
    vpp = train.virtual_pipeline_model_parallel_size
    model.check_parallel(tp, pp, vpp)
    grid = split_batch(
        world=world,
        tp=tp,
        pp=pp,
        vpp=vpp,
        micro_batch_size=train.micro_batch_size,
        global_batch_size=train.global_batch_size,
        source=source,
    )
    if train.seq_length > model.max_position_embeddings:
        raise ValueError(f"seq_length={train.seq_length} > max_position_embeddings={model.max_position_embeddings}")
    return grid


def parse_spec(spec: dict[str, Any], ops: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Split train_spec.json into its validated model and train configs; ``ops`` (the operational keys,
    ``--ops``) completes or overrides its ``train`` block. A key of ``ops`` that is not OPERATIONAL is an
    error: what changes the weights belongs in the spec, where it is a rerun trigger."""
    unknown = sorted(set(spec) - {"model", "train"})
    if unknown:
        raise ValueError(f"unknown train spec sections: {unknown}")
    ops = dict(ops or {})
    facts = sorted(set(ops) - OPERATIONAL)
    if facts:
        raise ValueError(f"--ops keys {facts} are not operational ({sorted(OPERATIONAL)}); put them in the spec")
    train = {**spec["train"], **ops}
    if "micro_batch_size" not in train:
        raise ValueError("train.micro_batch_size is in neither the spec nor --ops (rule train passes it in --ops)")
    return ModelConfig.from_dict(spec["model"]), TrainConfig.from_dict(train)
