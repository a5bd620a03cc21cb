"""Run the project's Snakefile on a config in a separate working directory (shared by DAG tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    """``snakemake -s <repo>/Snakefile --directory workdir --configfile configfile ARGS``, venv on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
