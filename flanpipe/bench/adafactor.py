"""``flanpipe bench adafactor``: does FLAN's "Adafactor, lr 3e-5" tune a pretrained model?

Adafactor's step is ``alpha_t * update`` with the update normalised to RMS <= 1 (clipping d = 1), and
    alpha_t = max(eps2, RMS(theta)) * rho_t   with parameter scaling (scale_parameter: true)
    alpha_t = rho_t                           without it
    rho_t   = min(lr, 1/sqrt(t))              with the relative-step clamp (relative_step: true), else lr.
At lr 3e-5 the clamp never binds (1/sqrt(t) > 3e-5 for every t < 1.1e9 steps), so only parameter
scaling matters: with it a weight of RMS 0.02 moves ~0.02 x 3e-5 = 6e-7 per step, without it ~3e-5,
fifty times more. This bench tunes the same base on the same packed data with each setting, one
``flanpipe launch`` per setting, and prints the training loss at the start and the end of the run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from flanpipe.plan.config import micro_batch_for

SETTINGS: dict[str, dict[str, bool]] = {
    "scaled, clamped (torch's default)": {"scale_parameter": True, "relative_step": True},
    "scaled, lr as given (Mesh-TF / T5X)": {"scale_parameter": True, "relative_step": False},
    "absolute step (HF with scale off)": {"scale_parameter": False, "relative_step": False},
}


def _losses(run_dir: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def summarize(losses: dict[int, float], steps: int) -> dict[str, float]:
    """Mean logged loss over the first and the last fifth of the run (one step's loss is noisy)."""
    fifth = max(1, steps // 5)
    first = [v for k, v in losses.items() if k <= fifth]
    last = [v for k, v in losses.items() if k > steps - fifth]
    return {"first_fifth": statistics.mean(first), "last_fifth": statistics.mean(last)}


def run_setting(spec: dict[str, Any], data: str, out: Path, threads: int) -> dict[int, float]:
    """Train one setting by the same launcher the DAG's train rule uses."""
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "flanpipe.cli", "--threads", str(threads), "launch", "--nproc", "1", "--",
           "--spec", str(spec_path), "--data", data, "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ValueError(f"bench adafactor: training {out.name} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return _losses(out)


def main(spec_path: str, data: str, steps: int, lr: float, threads: int, as_json: bool) -> dict[str, Any]:
    base = json.loads(Path(spec_path).read_text())
    if not base["train"].get("init_checkpoint"):
        raise ValueError(f"{spec_path}: train.init_checkpoint is empty; this bench tunes a pretrained base")
    results: dict[str, Any] = {"spec": spec_path, "steps": steps, "lr": lr, "settings": {}}
    with tempfile.TemporaryDirectory() as work:
        for i, (name, switches) in enumerate(SETTINGS.items()):
            spec = json.loads(json.dumps(base))
            spec["train"].update(steps=steps, lr=lr, adafactor=switches, tensorboard=False, save_interval=0)
            # one rank: the micro-batch rule train passes in --ops for DP 1 (a DAG spec holds no operational key)
            spec["train"].setdefault("micro_batch_size", micro_batch_for(spec["train"]["global_batch_size"], 1, 8))
            losses = run_setting(spec, data, Path(work) / f"setting{i}", threads)
            results["settings"][name] = {"switches": switches, **summarize(losses, steps), "losses": losses}
    runs = list(results["settings"].values())
    results["clamp_changes_nothing"] = runs[0]["losses"] == runs[1]["losses"]
    if as_json:
        print(json.dumps(results, indent=2))
        return results
    print(f"{base['train']['init_checkpoint']} tuned {steps} steps at lr {lr:g} ({threads} threads)")
    for name, r in results["settings"].items():
        print(f"  {name:<37} loss {r['first_fifth']:.3f} (first fifth) -> {r['last_fifth']:.3f} (last fifth)")
    same = results["clamp_changes_nothing"]
    print(f"  relative-step clamp changes nothing at this lr (losses bitwise equal): {same}")
    return results
