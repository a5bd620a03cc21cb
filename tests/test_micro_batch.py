"""The micro-batch follows the world size unless the config fixes it (flanpipe.plan.config.micro_batch_for)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from flanpipe.plan.config import ConfigError, check_world, load_config, micro_batch_for, train_ops, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("global_batch", "dp", "cap", "multiple", "micro"),
    [
        (8, 1, 8, 1, 8),  # one CPU rank: one pass of 8 rows instead of 8 passes of 1
        (8, 2, 8, 1, 4),
        (8, 8, 8, 1, 1),  # profiles/slurm: 8 tasks, one row each
        (12, 1, 8, 1, 6),  # largest divisor of 12 that is <= 8
        (7, 1, 4, 1, 1),  # a prime share: only 1 divides it under the cap
        (8, 1, 8, 2, 4),  # interleaved PP 2: 8 / 4 = 2 accumulation steps, a multiple of 2
        (8, 3, 8, 1, 1),  # 8 rows do not split over 3 ranks: 1, and check_world explains
    ],
)
def test_micro_batch_for(global_batch: int, dp: int, cap: int, multiple: int, micro: int) -> None:
    assert micro_batch_for(global_batch, dp, cap, multiple) == micro


def test_every_derived_micro_batch_divides_the_share() -> None:
    for g in range(1, 65):
        for dp in (1, 2, 4, 8):
            if g % dp:
                continue
            m = micro_batch_for(g, dp, cap=8)
            assert (g // dp) % m == 0 and 1 <= m <= 8
            # no larger divisor under the cap was skipped
            assert not any((g // dp) % k == 0 for k in range(m + 1, min(8, g // dp) + 1))


def _default() -> dict:
    return load_config(ROOT / "config" / "config.yaml")


def test_default_derives_micro_batch_from_the_world() -> None:
    cfg = _default()
    assert cfg["train"]["micro_batch_size"] is None and cfg["train"]["max_micro_batch_size"] == 8
    for world, micro in ((1, 8), (2, 4), (4, 2), (8, 1)):
        c = copy.deepcopy(cfg)
        assert check_world(c, world) == world
        assert train_ops(c)["micro_batch_size"] == micro
        # global = micro x DP x accumulation with accumulation 1 here
        assert micro * world == c["train"]["global_batch_size"] == 8
    # train_ops alone: DP 1 unless told
    assert train_ops(copy.deepcopy(cfg), dp=2)["micro_batch_size"] == 4
    with pytest.raises(ConfigError, match=r"8 is not a multiple of train.micro_batch_size x DP = 1 x 3"):
        check_world(copy.deepcopy(cfg), 3)


def test_explicit_micro_batch_is_kept() -> None:
    raw = {"registry": ["config/registry/embedded.yaml"], "held_out": ["nli"], "model": "config/models/tiny.yaml"}
    cfg = validate_config({**raw, "train": {"micro_batch_size": 2, "global_batch_size": 8}})
    assert check_world(cfg, 2) == 2 and cfg["train"]["micro_batch_size"] == 2
    assert train_ops(cfg, dp=2)["micro_batch_size"] == 2
    with pytest.raises(ConfigError, match="max_micro_batch_size"):
        validate_config({**raw, "train": {"max_micro_batch_size": 0}})


def test_cli_train_ops_follow_world(tmp_path: Path) -> None:
    """``flanpipe train --nproc N`` passes the micro-batch N ranks need in --ops; the spec never holds it."""
    import json

    from flanpipe.cli import main, train_ops_for

    for world, micro in ((1, 8), (2, 4), (8, 1)):
        assert train_ops_for(_default(), world)["micro_batch_size"] == micro
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        train_ops_for(_default(), 3)
    out = tmp_path / "spec.json"
    main(["train-spec", "heldout_nli", "--out", str(out)])
    assert "micro_batch_size" not in json.loads(out.read_text())["train"]
