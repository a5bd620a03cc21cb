"""One thread budget per job, applied to every pool this process starts.

A Snakemake job is given ``threads`` cores, and several jobs run side by side. Left alone, each
library sizes its own pool to the whole machine: Polars (``POLARS_MAX_THREADS``, read once, when
polars is first imported), torch intra-op (``OMP_NUM_THREADS`` at import, ``torch.set_num_threads``
after), SentencePiece (its ``num_threads`` argument). On 2 cores with 2 jobs that is 2 x 2 = 4 busy
threads fighting for 2 cores. ``limit_threads`` sets all of them to the job's budget; call it before
anything imports polars or torch (the workflow scripts call it first thing; the CLI has ``--threads``).

This module imports nothing heavy, so importing it never starts a pool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Pools sized from the environment when their library loads (Snakemake's shell sets the OMP/BLAS
# ones for shell rules; Polars' is ours to set).
POOL_VARS = (
    "POLARS_MAX_THREADS",
    "RAYON_NUM_THREADS",  # Rust pools other than Polars' (tokenizers, ...)
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


def pool_env(n: int) -> dict[str, str]:
    """The environment that sizes every pool of a process started with it to ``n`` threads (at least 1).

    All of them, not only ``OMP_NUM_THREADS``: torch's matmuls run on MKL or OpenBLAS, whose own
    variables Snakemake sets to the whole job's threads, so a training rank given only OMP_NUM_THREADS=1
    still ran its BLAS on every core of the job (oversubscribed beside the other ranks, and summing in
    another order than a rank that had them at 1).
    """
    return dict.fromkeys(POOL_VARS, str(max(1, int(n))))


def limit_threads(n: int) -> int:
    """Size every pool of this process to ``n`` threads (at least 1); return n.

    Polars reads its variable only at import, so a late call cannot shrink a pool it already has:
    that is reported on stderr rather than silently ignored.
    """
    n = max(1, int(n))
    os.environ.update(pool_env(n))
    if "polars" in sys.modules:
        import polars as pl

        if pl.thread_pool_size() != n:
            print(
                f"flanpipe: polars was imported with {pl.thread_pool_size()} threads before limit_threads({n})",
                file=sys.stderr,
            )
    torch = sys.modules.get("torch")
    if torch is not None:  # resized when a caller has loaded it; core never loads torch itself
        torch.set_num_threads(n)
    return n


def threads_per_rank(job_threads: int, local_ranks: int) -> int:
    """Intra-op threads of each of ``local_ranks`` ranks sharing a job's ``job_threads`` cores.

    floor division, at least 1: 2 cores / 1 rank = 2 threads; 8 cores / 2 ranks = 4; 2 cores / 4
    ranks = 1 (oversubscribed either way: the job asked for fewer cores than ranks).
    """
    if local_ranks < 1:
        raise ValueError(f"local_ranks must be >= 1, got {local_ranks}")
    return max(1, job_threads // local_ranks)


def job_threads(env: os._Environ[str] | dict[str, str] | None = None) -> int:
    """The cores this job may use: Snakemake's ``OMP_NUM_THREADS`` (it sets it to the rule's
    ``threads`` in every shell job), else the CPUs this process may run on."""
    env = os.environ if env is None else env
    value = env.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_job_threads(cores: int, run: str, init: Mapping[str, str | None]) -> int:
    """Threads of train job ``run`` among the runs ``init`` (run -> the run whose weights start it).

    A run can train beside any run that is neither its ancestor nor its descendant through ``init``.
    One with no such run (a base that every other run starts from, or the only run) trains alone:
    all ``cores``. Otherwise half, so two jobs side by side fill the cores without oversubscribing
    (Snakemake also scales a rule's threads down to ``--cores``).
    """

    def ancestors(name: str) -> set[str]:
        seen: set[str] = set()
        while (name := init.get(name) or "") in init and name not in seen:
            seen.add(name)
        return seen

    mine = ancestors(run)
    beside = [r for r in init if r != run and r not in mine and run not in ancestors(r)]
    return max(1, cores if not beside else cores // 2)
