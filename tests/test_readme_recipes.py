"""The README's cluster and HF recipes, run as written from the repository root (dry runs: a real run is days).

Each command below must appear verbatim in README.md; it runs in a copy of the checkout (what a user's clone
holds: Snakefile, rules, workflow, config, profiles and the ``slurm`` link), with only the placeholder checkpoint
path replaced by a tiny local HF checkpoint built here and ``-n`` appended. The FLAN registry's local sources
(manual downloads under ``resources/``, which the README says to prepare first) are created empty, as the DAG
checks only that they exist while planning.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from dag import ROOT, snakemake
from safetensors.torch import save_file

from flanpipe.core.registry import load_registry

torch = pytest.importorskip("torch")

README = (ROOT / "README.md").read_text(encoding="utf-8")
PLACEHOLDER = "/data/Meta-Llama-3-8B"
CLUSTER = "snakemake --profile slurm"
HF = (
    "snakemake --profile slurm --configfile config/flan_hf.yaml --config base='{hf: /data/Meta-Llama-3-8B, fewshot: 1}'"
)
HF_ELSEWHERE = (
    "snakemake --profile slurm --directory runs/flan_hf --configfile config/flan_hf.yaml "
    "--config base='{hf: /data/Meta-Llama-3-8B, fewshot: 1}' data='{root: ../..}'"
)
IMPORT = "flanpipe import-hf /data/Meta-Llama-3-8B --out results/base/hf/Meta-Llama-3-8B"
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository root as a user's clone has it, plus the manual sources the README asks for."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(ROOT / "Snakefile", root / "Snakefile")
    for d in ("rules", "workflow", "config", "profiles"):
        shutil.copytree(ROOT / d, root / d)
    (root / "slurm").symlink_to("profiles/slurm")
    for spec in load_registry([str(ROOT / "config" / "registry" / "flan" / "*.yaml")]).values():
        if spec.source.type == "local":
            for split in spec.splits.values():
                path = root / spec.source.path.format(split=split)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    return root


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (tied, GQA) with a byte-level BPE tokenizer: what /data/Meta-Llama-3-8B stands for."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf") / "Meta-Llama-3-8B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    h, f, v, kv = 32, 64, 100, 16
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (h if x in "qo" else kv, h) for x in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, d / "model.safetensors", metadata={"format": "pt"})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [f"premise {i} hypothesis answer yes no" for i in range(50)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=100, special_tokens=["<s>", "</s>"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


def as_written(command: str, llama: Path) -> list[str]:
    """The README's command (checked to be there verbatim), with the tiny checkpoint for the placeholder."""
    assert command in README, f"README.md no longer says {command!r}: update this test with it"
    return shlex.split(command.replace(PLACEHOLDER, str(llama)))


def dry_run(checkout: Path, argv: list[str]) -> str:
    assert argv[0] == "snakemake"
    r = snakemake(*argv[1:], "-n", cwd=checkout, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


def job_counts(out: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", out, flags=re.MULTILINE)}


def test_cluster_recipe_plans_the_embedded_default(checkout: Path, llama: Path) -> None:
    """`snakemake --profile slurm` from the root: the embedded default, through the SLURM profile."""
    jobs = job_counts(dry_run(checkout, as_written(CLUSTER, llama)))
    assert jobs["train"] == 3 and jobs["train_tokenizer"] == 1  # the base LM and the two held-out runs


def test_hf_recipe_means_what_flan_hf_yaml_says(checkout: Path, llama: Path) -> None:
    """The HF recipe failed as written: fewshot arrived as the string '1', and without it config.yaml's
    base.pretrain_steps: 150 (merged under every --configfile) conflicted with base.hf."""
    out = dry_run(checkout, as_written(HF, llama))
    jobs = job_counts(out)
    assert jobs["import_hf"] == 1 and jobs["export_hf"] == jobs["train"] == 6, jobs
    assert "train_tokenizer" not in jobs and "generate_synthetic" not in jobs  # nothing of config/config.yaml
    assert "natural-1shot" in out  # base.fewshot: 1, typed as the integer the schema says
    assert "has no effect" not in out  # no false warning about few-shot with base.hf


def test_hf_recipe_in_its_own_directory(checkout: Path, llama: Path) -> None:
    out = dry_run(checkout, as_written(HF_ELSEWHERE, llama))
    assert job_counts(out)["import_hf"] == 1
    assert not (checkout / "results").exists()  # everything went under runs/flan_hf


def test_import_command_as_written(checkout: Path, llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flanpipe.cli import main

    argv = as_written(IMPORT, llama)
    assert argv[0] == "flanpipe"
    monkeypatch.chdir(checkout)
    main(argv[1:])
    assert (checkout / "results" / "base" / "hf" / "Meta-Llama-3-8B" / "model.json").exists()
    shutil.rmtree(checkout / "results")
