"""Resumable checkpoints: a killed run, started again, ends bit-identical to an uninterrupted one.

Three runs of the same spec at TP=2 (2 ranks, so the optimizer's per-shard state and the
signal agreement across ranks are exercised) on the tiny counting task (CPU, fp32):
- the reference: torchrun, no interruption;
- SIGKILL of torchrun and its workers (like a lost node) once a periodic checkpoint exists,
  then the same command again: it resumes from ``<out>.ckpt/latest``;
- SIGTERM (what SLURM sends before preemption or the time limit) to one rank of a run launched
  as srun does (one process per rank, env:// rendezvous): every rank finishes the step, the
  checkpoint is saved, each exits with PREEMPTED_EXIT_CODE; the same command finishes the run.
The checkpoint saved at TP=2 and loaded at TP=1 with the same loss is checked in
tests/test_train.py::test_two_rank_layouts_match_single_rank (it reuses that test's TP=2 run).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import REPO, clean_env, make_spec, read_log, torchrun, torchrun_cmd

from flanpipe.core import train_config
from flanpipe.model import checkpointing
from flanpipe.model.gpt import load_scorer

STEPS = 40  # long enough (~1 s of steps at TP=2) that a signal sent after the first steps lands mid-run
TP = 2


def weights(out: Path) -> dict[str, torch.Tensor]:
    state = load_scorer(out).model.state_dict()
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def assert_same_run(out: Path, reference: Path) -> None:
    """Bitwise-equal final weights, and the same logged losses, as the reference run."""
    got, want = weights(out), weights(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    log, ref_log = read_log(out), read_log(reference)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    done, ref_done = (json.loads((p / "done.json").read_text()) for p in (out, reference))
    assert (done["first_loss"], done["final_loss"]) == (ref_done["first_loss"], ref_done["final_loss"])
    assert done["target_tokens"] == ref_done["target_tokens"]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before the interruption point")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for training to reach the interruption point")
        time.sleep(0.01)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, like a lost node. (torchrun starts
    each worker in a session of its own, so killing torchrun's process group would miss it.)"""
    import psutil

    parent = psutil.Process(pid)
    procs = [*parent.children(recursive=True), parent]
    for p in procs:
        p.suspend()  # freeze the whole tree first: no step or save goes on while we kill it
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


def logged_steps(out: Path) -> int:
    path = out / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, megatron_packed_dir) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = torchrun(TP, make_spec(steps=STEPS, tensor_model_parallel_size=TP), megatron_packed_dir, out)
    assert done["resumed_from_step"] == 0
    ckpt = checkpointing.default_ckpt_dir(out)
    # Default cadence: one resumable checkpoint, at the end; eval's checkpoint/ in the run dir.
    assert sorted(p.name for p in ckpt.iterdir()) == [f"iter_{STEPS:07d}", "latest"]
    assert (ckpt / "latest").read_text() == f"iter_{STEPS:07d}\n"
    assert (out / "checkpoint" / "metadata.json").exists()
    return out


def test_sigkill_then_rerun_resumes_bit_identical(tmp_path, megatron_packed_dir, reference):
    out = tmp_path / "run"
    spec = make_spec(steps=STEPS, save_interval=10, keep_checkpoints=2, tensor_model_parallel_size=TP)
    cmd = torchrun_cmd(TP, spec, megatron_packed_dir, out)
    ckpt = checkpointing.default_ckpt_dir(out)
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(TP), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (ckpt / "latest").exists(), proc)
    finally:
        kill_tree(proc.pid)  # torchrun and its worker, without warning
        proc.wait(timeout=60)
    killed_at = checkpointing.checkpoint_step(checkpointing.latest_checkpoint(ckpt))
    assert 10 <= killed_at < STEPS and not (out / "done.json").exists()

    done = torchrun(TP, spec, megatron_packed_dir, out)  # the same command again
    assert done["resumed_from_step"] >= killed_at
    assert_same_run(out, reference)
    # Every 10 steps plus the end, the newest 2 kept; no temp dirs left behind.
    assert sorted(p.name for p in ckpt.iterdir()) == [f"iter_{STEPS - 10:07d}", f"iter_{STEPS:07d}", "latest"]


def launch_ranks(argv: list[str], nproc: int) -> list[subprocess.Popen]:
    """One ``python -m flanpipe.train.loop`` process per rank with the env:// variables set, as
    ``srun`` + flanpipe.train.launch do: each rank's exit status is its own."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = clean_env(nproc) | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "flanpipe.train.loop", *argv],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_saves_exits_143_and_resumes(tmp_path, megatron_packed_dir, reference):
    """No periodic saves: the only checkpoint before the end is the one SIGTERM triggers.

    The signal goes to rank 1 only: rank 0 learns of it through the per-step all-reduce, so
    both stop after the same step and save one consistent checkpoint.
    """
    out = tmp_path / "run"
    ckpt = tmp_path / "elsewhere.ckpt"  # --ckpt-dir
    spec = make_spec(steps=STEPS, tensor_model_parallel_size=TP)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    argv = ["--spec", str(spec_path), "--data", str(megatron_packed_dir), "--out", str(out), "--ckpt-dir", str(ckpt)]
    procs = launch_ranks(argv, TP)
    wait_for(lambda: logged_steps(out) >= 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == checkpointing.PREEMPTED_EXIT_CODE == 143, stdout[-2000:] + stderr[-3000:]
    latest = checkpointing.latest_checkpoint(ckpt)
    stopped_at = checkpointing.checkpoint_step(latest)
    assert 3 <= stopped_at < STEPS, stopped_at
    assert f"saved {latest} at step {stopped_at}" in outputs[0][0]
    assert not (out / "done.json").exists() and not checkpointing.default_ckpt_dir(out).exists()
    meta = checkpointing.read_meta(latest)
    assert meta["consumed_samples"] == stopped_at * spec["train"]["global_batch_size"]
    assert meta["layout"] == {"tp": TP, "pp": 1, "dp": 1, "vpp": 1}

    procs = launch_ranks(argv, TP)  # the same command again
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * TP, outputs[0][0][-2000:] + outputs[0][1][-3000:]
    assert f"resuming from {latest.name} (step {stopped_at})" in outputs[0][0]
    assert json.loads((out / "done.json").read_text())["resumed_from_step"] == stopped_at
    assert_same_run(out, reference)


def test_stale_checkpoints_are_discarded(tmp_path, reference):
    """A checkpoint dir left by a run with another spec (or past this run's steps) is not
    resumed: it is removed and the run starts over, as Snakemake reruns a job whose params
    changed. Spec keys that do not change the trajectory (steps, save cadence) keep it."""
    from flanpipe.model.gpt import init_single_process
    from flanpipe.train.loop import _resume_point

    init_single_process()
    src = checkpointing.latest_checkpoint(checkpointing.default_ckpt_dir(reference))
    fp = checkpointing.read_meta(src)["fingerprint"]
    ckpt = tmp_path / "run.ckpt"

    def plant() -> None:
        ckpt.mkdir(exist_ok=True)
        subprocess.run(["cp", "-r", str(src), str(ckpt / src.name)], check=True)
        (ckpt / "latest").write_text(src.name + "\n")

    plant()
    assert _resume_point(ckpt, fp, steps=STEPS + 40) == ckpt / src.name  # more steps: continue it
    assert _resume_point(ckpt, "another-spec", steps=STEPS) is None
    assert list(ckpt.iterdir()) == []
    plant()
    assert _resume_point(ckpt, fp, steps=STEPS - 1) is None  # fewer steps than it already did
    assert list(ckpt.iterdir()) == []
    # The fingerprint ignores keys that do not change the trajectory, and spelled-out defaults; it covers
    # the spec, the packed data, the tokenizer, the initial weights and the code version.
    from flanpipe.core.train_config import changed_parts, fingerprint_parts, parse_spec

    def parts(tc, **kw):  # noqa: ANN001, ANN202
        return fingerprint_parts(cfg.to_dict(), vars(tc), **{"data": "d", "tokenizer": "t", "init": "i", **kw})

    cfg, tc = parse_spec(
        make_spec(steps=5, save_interval=7, tensorboard=False, micro_batch_size=2, tensor_model_parallel_size=2)
    )
    _, tc2 = parse_spec(make_spec())
    base = parts(tc2)
    assert train_config.fingerprint(parts(tc)) == train_config.fingerprint(base)
    _, tc3 = parse_spec(make_spec(lr=1e-2))
    assert changed_parts(base, parts(tc3)) == ["spec"]
    for key in ("data", "tokenizer", "init"):
        other = parts(tc2, **{key: "x"})
        assert train_config.fingerprint(other) != train_config.fingerprint(base)
        assert changed_parts(base, other) == [key]
    assert changed_parts(None, base) == sorted(base)  # a checkpoint that recorded no parts


def test_layout_change_refuses_optimizer_state(tmp_path, reference):
    """The TP=2 checkpoint's optimizer state cannot resume this TP=1 process (its weights can:
    see tests/test_train.py); the fingerprint ignores the layout so that this is an error and
    not a silent restart."""
    from flanpipe.model.gpt import init_single_process

    init_single_process()
    meta = checkpointing.read_meta(checkpointing.latest_checkpoint(checkpointing.default_ckpt_dir(reference)))
    assert meta["layout"] == {"tp": TP, "pp": 1, "dp": 1, "vpp": 1}
    with pytest.raises(RuntimeError, match="cannot be resharded"):
        checkpointing.check_layout(meta, tmp_path)
    checkpointing.check_layout({**meta, "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1}}, tmp_path)  # same layout: fine


def test_sigterm_to_the_torchrun_launcher_exits_143_and_the_rerun_resumes(tmp_path, megatron_packed_dir, reference):
    """`flanpipe launch` on a workstation runs torchrun, which reports any worker exit as its own
    failure (1). SIGTERM to the launcher alone reaches the ranks through torchrun; they save and
    leave the preempted marker, and the launcher exits 143 like srun would: requeue, not crash."""
    out = tmp_path / "run"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(make_spec(steps=STEPS, tensor_model_parallel_size=TP)))
    train_args = ["--spec", str(spec_path), "--data", str(megatron_packed_dir), "--out", str(out)]
    cmd = [sys.executable, "-m", "flanpipe.cli", "launch", "--nproc", str(TP), "--mpi", "", "--", *train_args]
    kw = {"cwd": REPO, "env": clean_env(TP), "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, **kw)
    wait_for(lambda: logged_steps(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == checkpointing.PREEMPTED_EXIT_CODE, stdout[-2000:] + stderr[-3000:]
    ckpt = checkpointing.default_ckpt_dir(out)
    marker = json.loads((ckpt / checkpointing.PREEMPTED_MARKER).read_text())
    assert marker["checkpoint"] == str(checkpointing.latest_checkpoint(ckpt)) and 3 <= marker["step"] < STEPS

    rerun = subprocess.run(cmd, **kw, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert not (ckpt / checkpointing.PREEMPTED_MARKER).exists(), "a finished run is no longer preempted"
    assert json.loads((out / "done.json").read_text())["resumed_from_step"] == marker["step"]
    assert_same_run(out, reference)
