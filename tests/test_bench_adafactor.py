"""The Adafactor bench's summary: mean loss over the first and last fifth of the logged steps."""

import pytest

from flanpipe.bench.adafactor import SETTINGS, summarize


def test_summary_averages_the_first_and_last_fifth():
    losses = {1: 4.0, 10: 3.0, 20: 2.5, 30: 2.0, 40: 1.0, 50: 0.5}
    # 50 steps: a fifth is 10 steps -> first = steps 1 and 10, last = steps > 40
    assert summarize(losses, 50) == {"first_fifth": pytest.approx(3.5), "last_fifth": pytest.approx(0.5)}


def test_settings_cover_both_switches():
    switches = {tuple(sorted(s.items())) for s in SETTINGS.values()}
    assert (("relative_step", False), ("scale_parameter", False)) in switches
    assert (("relative_step", True), ("scale_parameter", True)) in switches
    assert (("relative_step", False), ("scale_parameter", True)) in switches
