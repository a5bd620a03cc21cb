"""What a job pays before its work starts: each job imports only what it uses, Megatron loads without
torch.compile's machinery, and the process settings a training or scoring job makes take effect.

Fresh interpreters (``subprocess``) check the imports, as a Snakemake job starts one; no timings here
(``flanpipe bench train --peer`` and README's Performance section carry the figures).
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest


def _loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {modules!r} if m in sys.modules))"
    return eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def test_pack_and_launch_jobs_import_neither_torch_nor_megatron() -> None:
    """A pack job writes the IndexedDataset files itself; the launcher only starts the ranks and waits."""
    code = (
        "from flanpipe.data.packing import pack_mixture\n"
        "from flanpipe.train import launch\n"
        "launch.ckpt_dir_of(['--out', 'results/models/run'])\n"
        "from flanpipe.core.preemption import was_preempted, clear_preempted\n"
    )
    assert _loaded(code, ("torch", "megatron")) == []


def test_ingest_and_render_jobs_load_neither_the_schema_validator_nor_arrow() -> None:
    """~80 of the default's ~130 jobs ingest or render: they rebuild a spec from its facts (no registry file
    to validate: jsonschema loads in load_registry) and render patterns through Polars (pyarrow and numpy
    load when Jinja rows are rendered)."""
    code = (
        "from flanpipe.core.registry import spec_from_facts\n"
        "from flanpipe.data.ingest import ingest_split\n"
        "from flanpipe.data.formats import FormatMix\n"
        "from flanpipe.data.templates import render_shard, render_eval_shard\n"
    )
    assert _loaded(code, ("jsonschema", "pyarrow", "numpy", "torch")) == []


def test_an_evaluate_job_loads_no_metric_library_and_no_compiler_at_import() -> None:
    """rouge_score (-> nltk -> scipy) and sacrebleu load on first use; Megatron's @jit_fuser kernels are
    decorated without importing torch._dynamo / torch._inductor."""
    code = "import flanpipe.eval.evaluate, flanpipe.eval.inference, megatron.core.models.gpt, megatron.core.jit"
    heavy = ("rouge_score", "nltk", "scipy", "sacrebleu", "torch._dynamo", "torch._inductor")
    assert _loaded(code, (*heavy, "megatron.core")) == ["megatron.core"]


def test_compile_on_first_call_defers_the_compiler() -> None:
    from flanpipe.model.megatron_compat import _compile_on_first_call

    calls = []

    def fake_compile(fn, **options):
        calls.append((fn, options))
        return lambda *a: ("compiled", fn(*a))

    lazy = _compile_on_first_call(fake_compile)

    def double(x):
        return 2 * x

    decorated = lazy(double)
    with_options = lazy(fullgraph=True)(double)
    assert calls == [] and decorated.__name__ == "double"  # decorating compiles nothing
    assert decorated(3) == decorated(3) == ("compiled", 6) and len(calls) == 1  # compiled once, at first call
    assert with_options(1) == ("compiled", 2) and calls[-1] == (double, {"fullgraph": True})
    module = types.SimpleNamespace()  # not a function (a torch.nn.Module, say): compiled at once, as torch does
    lazy(module)
    assert calls[-1] == (module, {})


def test_importing_megatron_leaves_torch_compile_as_it_was() -> None:
    import torch

    from flanpipe.model import megatron_compat

    compile_ = torch.compile
    megatron_compat.import_megatron()  # a no-op once Megatron is loaded
    assert torch.compile is compile_ and "megatron.core.jit" in sys.modules


def test_synchronous_checkpoint_saves_need_no_manager_process() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from flanpipe.model import megatron_compat

    megatron_compat.save_results_in_process()
    assert isinstance(filesystem_async._results_queue, queue.Queue)


def test_heap_settings_take_on_glibc() -> None:
    """In a fresh process: a training process's setting, then a converter's (which undoes its no-mmap rule)."""
    from flanpipe.core import heap

    if heap._libc() is None:
        pytest.skip("not glibc: mallopt is absent and both settings are no-ops")
    code = "from flanpipe.core import heap\nprint(heap.keep_freed_memory(), heap.return_large_frees_to_the_os())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]
