"""Helpers the tests share: the repository root, small file writers, and running the real Snakefile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def venv_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default os.environ) with this interpreter's bin first on PATH, so rules' shell commands
    (``flanpipe launch``) run from the same virtual environment as the test."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def snakemake(*args: str | os.PathLike[str], cwd: Path = ROOT, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    """``snakemake ARGS`` in ``cwd``, venv on PATH; the caller checks the return code."""
    cmd = [SNAKEMAKE, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=venv_env(), timeout=timeout, check=False)


def run_snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    """``snakemake -s <repo>/Snakefile --directory workdir --configfile configfile ARGS``, venv on PATH."""
    sm_args = ("-s", ROOT / "Snakefile", "--directory", workdir, "--configfile", configfile, *args)
    return snakemake(*sm_args, timeout=timeout)
