"""Small I/O helpers shared by every stage.

Outputs are written atomically (temp file in the same directory, then ``os.replace``) so that a job
killed half-way never leaves a plausible-looking partial output for Snakemake or a user to trust.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    """The process umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    The temp name keeps the final suffix so writers that dispatch on it (Polars, SentencePiece) work.
    ``mkstemp``/``mkdtemp`` create 0600/0700 entries; the output gets the mode a plain ``open()`` or
    ``mkdir`` would give under the user's umask, so others in the group can read results.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())
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


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # flanpipe/core/io.py -> the repository root


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


def read_json_object(path: str | os.PathLike[str], error: type[ValueError] = ValueError) -> dict[str, Any]:
    """A JSON file that must hold one object (a checkpoint's side files); a broken one names itself
    through ``error`` (the caller's error class)."""
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise error(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def files_digest(files: dict[str, str | os.PathLike[str]]) -> str:
    """sha256 (hex) of named files' contents: name -> path, hashed in name order, each name and size before its
    bytes so that moving bytes from one file to the next changes the digest. Streams in 1 MiB reads, so a
    multi-GB packed dataset costs one sequential read (~1 GB/s), never its size in memory."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(files):
        path = Path(files[name])
        h.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# YAML 1.1 (PyYAML) reads ``3e-5`` and ``1e3`` as strings: a float needs a dot there. Users write them
# as YAML 1.2 and JSON do, so the one loader also resolves exponent floats without a dot.
FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (YAML keeps the last silently) and reads YAML
    1.2-style floats (``3e-5``) as numbers. Every YAML file flanpipe reads goes through it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        check_unique_keys(node)
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+0123456789."))


def check_unique_keys(node: yaml.Node) -> None:
    """A key given twice in one mapping is an error naming both lines (merge keys ``<<`` excepted)."""
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[Any, int] = {}
    for key, _value in node.value:
        if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
            continue
        line = key.start_mark.line + 1
        if key.value in first:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key.value!r} (first at line {first[key.value]}); YAML would silently keep only "
                "the last value - remove or rename one",
                key.start_mark,
            )
        first[key.value] = line


def yaml_error_message(e: yaml.YAMLError, source: str) -> str:
    """``file:line:column: invalid YAML: problem`` for a parser or constructor error."""
    mark = getattr(e, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(e, "problem", None) or str(e)
    return f"{where}: invalid YAML: {problem}"


def load_yaml_text(text: str, source: str, loader: type[yaml.SafeLoader] = StrictLoader) -> Any:
    """Parse YAML text with the strict loader; errors name ``source`` (a file) and the line."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(yaml_error_message(e, source)) from e


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Load YAML strictly; a syntax error or duplicate key names the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: file not found") from e
    return load_yaml_text(text, str(p))
