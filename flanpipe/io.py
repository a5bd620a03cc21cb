"""Small I/O helpers shared by every stage.

Outputs are written atomically (temp file in the same directory, then ``os.replace``) so that a job
killed half-way never leaves a plausible-looking partial output for Snakemake or a user to trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    The temp name keeps the final suffix so writers that dispatch on it (Polars, SentencePiece) work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """Config-relative files (registry, templates, model configs) resolve against the working directory
    first, then against the project checkout, so the workflow also runs with ``--directory elsewhere``."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (PROJECT_ROOT / p).exists():
        return p
    return PROJECT_ROOT / p


@contextmanager
def log_to(path: str | os.PathLike[str]) -> Iterator[None]:
    """Send stdout and stderr (Python's and child processes') to a rule's log file."""
    import sys

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as f:
        saved = sys.stdout, sys.stderr, os.dup(1), os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc(file=f)
            raise
        finally:
            f.flush()
            sys.stdout, sys.stderr = saved[0], saved[1]
            os.dup2(saved[2], 1), os.dup2(saved[3], 2)
            os.close(saved[2]), os.close(saved[3])


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as stable, human-readable JSON (sorted keys), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Load YAML; a syntax error names the file and line instead of a bare parser trace."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: file not found") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{where}: invalid YAML: {problem}") from e
