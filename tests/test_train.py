"""Training end to end on a learnable toy task, in-process and under torchrun (1 and 2 ranks).

The 2-rank runs start from the same checkpoint as the 1-rank reference, so their losses and
weights must agree to float rounding step after step: TP only splits the matmuls (and
flanpipe.train.optim.Adafactor reduces its statistics over the TP group), PP only moves activations
between stages, DP only splits the batch (the loss is a token mean over the global batch).
Resuming, SIGKILL/SIGTERM and the checkpoint directory are tested in tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import counting_examples
from dag import ROOT as REPO

from flanpipe.core.model_config import ModelConfig, flops_per_token, load_model_config
from flanpipe.core.train_config import TrainConfig, parse_spec, plan_layout
from flanpipe.model.gpt import load_scorer, model_provider
from flanpipe.train.loop import train

# Set by a parent torchrun; a child launched with them would join the wrong rendezvous.
TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "vocab_size": 64,
    "max_position_embeddings": 32,
    "position_embedding_type": "rope",
    "gated_linear_unit": False,
    "activation": "gelu",
    "normalization": "LayerNorm",
    "init_method_std": 0.02,
}
TRAIN = {
    "steps": 30,
    "lr": 3e-2,
    "warmup_steps": 0,
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "seq_length": 32,
    "seed": 1234,
    "log_interval": 1,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "optimizer": "adafactor",
    "weight_decay": 0.0,
    "clip_grad": 1.0,
}


def make_spec(**train) -> dict:
    return {"model": dict(MODEL), "train": {**TRAIN, **train}}


def clean_env(nproc: int) -> dict[str, str]:
    """This environment without a parent torchrun's variables; 1 thread per rank when > 1 rank."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else env.get("OMP_NUM_THREADS", "2")
    return env


def torchrun_cmd(nproc: int, spec: dict, data: Path, out: Path) -> list[str]:
    """argv of ``python -m flanpipe.train.loop`` under torchrun; writes the spec next to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return cmd + ["-m", "flanpipe.train.loop", "--spec", str(spec_path), "--data", str(data), "--out", str(out)]


def torchrun(nproc: int, spec: dict, data: Path, out: Path) -> dict:
    """Launch ``python -m flanpipe.train.loop`` under torchrun in a clean environment; return done.json."""
    cmd = torchrun_cmd(nproc, spec, data, out)
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(nproc), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "done.json").read_text())


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def mean_target_loss(scorer, examples) -> float:
    """Token-mean next-token loss on the target part (incl. EOS), one example per row."""
    total, count = 0.0, 0
    for inputs, targets in examples:
        ids = torch.tensor([inputs + targets])
        logp = torch.log_softmax(scorer.logits(ids)[0, :-1], dim=-1)
        nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        total += nll[len(inputs) - 1 :].sum().item()
        count += len(targets)
    return total / count


def test_spec_validation():
    cfg, tc = parse_spec(make_spec())
    assert cfg == ModelConfig(**MODEL) and tc.steps == 30
    # global 8 = micro 4 x dp 1 x accumulation 2 = micro 4 x dp 2 x accumulation 1
    assert (plan_layout(tc, cfg, world=1).dp, plan_layout(tc, cfg, world=1).accumulation) == (1, 2)
    assert (plan_layout(tc, cfg, world=2).dp, plan_layout(tc, cfg, world=2).accumulation) == (2, 1)
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp"):
        plan_layout(TrainConfig.from_dict({**TRAIN, "global_batch_size": 12}), cfg, world=2)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        plan_layout(TrainConfig.from_dict({**TRAIN, "tensor_model_parallel_size": 8}), cfg, world=8)
    with pytest.raises(ValueError, match="must divide num_layers"):
        plan_layout(TrainConfig.from_dict({**TRAIN, "pipeline_model_parallel_size": 4}), cfg, world=4)
    with pytest.raises(ValueError, match="unknown train spec keys"):
        TrainConfig.from_dict({**TRAIN, "stepz": 3})
    with pytest.raises(ValueError, match="must divide hidden_size"):
        ModelConfig(**{**MODEL, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        TrainConfig.from_dict({**TRAIN, "keep_checkpoints": 0})


def test_flops_per_token_written_out():
    cfg = ModelConfig(**MODEL)
    # N = 75,264 params - 64 x 64 input embedding (a lookup) = 71,168 in matmuls:
    # 6 N = 427,008; attention scores + weighted sum: 12 x 2 layers x 64 x 32 tokens = 49,152.
    assert flops_per_token(cfg, 32) == 6 * (75_264 - 64 * 64) + 12 * 2 * 64 * 32 == 476_160


def test_lr_schedule_and_clipping_match_references():
    from flanpipe.model.gpt import init_single_process
    from flanpipe.train.optim import build_optimizer, lr_at

    assert [lr_at(t, lr=1.0, warmup_steps=4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, lr=0.1) == 0.1

    # Megatron's FP32Optimizer clipping (with the CPU clip function) equals torch's clip_grad_norm_.
    init_single_process()
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref.load_state_dict(ours.state_dict())
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    optimizer = build_optimizer([ours], lr=1e-2, clip_grad=0.5)
    norm = optimizer.clip_grad_norm(0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6) and norm > 0.5
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_cpu_rope_and_cross_entropy_match_megatrons():
    """The CPU fast paths megatron_compat installs: RoPE to 1 ulp (a fused multiply-add may round once where
    Megatron rounds twice), TP=1 cross entropy to 1e-6."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rope_utils

    from flanpipe.model.gpt import init_single_process

    init_single_process()  # applies megatron_compat
    gen = torch.Generator().manual_seed(0)
    rope = rope_utils._apply_rotary_pos_emb_bshd
    t = torch.randn(16, 2, 4, 8, generator=gen, requires_grad=True)
    freqs = torch.randn(16, 1, 1, 8, generator=gen)
    ours, ref = rope(t, freqs), rope.original(t, freqs)
    torch.testing.assert_close(ours, ref, rtol=2.5e-7, atol=1e-6)
    g = torch.randn(ours.shape, generator=gen)
    torch.testing.assert_close(
        torch.autograd.grad(ours, t, g)[0], torch.autograd.grad(ref, t, g)[0], rtol=2.5e-7, atol=1e-6
    )

    ce = tensor_parallel.vocab_parallel_cross_entropy
    logits = torch.randn(16, 2, 64, generator=gen)
    logits[..., 60:] = float("-inf")  # padded vocabulary rows (flanpipe.model.gpt.mask_padded_vocab)
    logits.requires_grad_(True)
    target = torch.randint(0, 60, (16, 2), generator=gen)
    ours, ref = ce(logits, target), ce.original(logits.clone(), target)
    assert ours.shape == ref.shape == target.shape
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    grads = [torch.autograd.grad(x.sum(), logits)[0] for x in (ours, ref)]
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_cpu_rmsnorm_matches_torchs():
    """megatron_compat.CpuRMSNorm (what a CPU model's RMSNorms become): torch's forward exactly, its gradients
    to float rounding; without grad (evaluation) torch's own path."""
    from flanpipe.model import megatron_compat

    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(32, generator=gen) + 0.5)
    ours = torch.nn.RMSNorm(32, eps=1e-5)
    ours.load_state_dict(ref.state_dict())
    megatron_compat.use_cpu_norms(torch.nn.Sequential(ours))
    assert type(ours) is megatron_compat.CpuRMSNorm
    x = torch.randn(7, 3, 32, generator=gen, requires_grad=True)
    g = torch.randn(7, 3, 32, generator=gen)
    a, b = ours(x), ref(x)
    assert torch.equal(a, b)
    grads = (torch.autograd.grad(y, [x, norm.weight], g) for y, norm in ((a, ours), (b, ref)))
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_cpu_swiglu_matches_megatrons_unfused_mlp_bit_for_bit():
    """A gated SiLU's MLP through megatron_compat's eager SwiGLU (the bias+activation fusion path on a CPU)
    equals Megatron's unfused MLP exactly: output and every gradient."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    from flanpipe.model.gpt import init_single_process, transformer_config

    init_single_process()
    cfg = ModelConfig(**{**MODEL, "gated_linear_unit": True, "activation": "silu"})
    fused = transformer_config(cfg)
    assert fused.bias_activation_fusion  # what flanpipe.model.gpt.fusion_flags chooses on a CPU
    unfused = dataclasses.replace(fused, bias_activation_fusion=False)
    spec = get_gpt_layer_local_spec().submodules.mlp.submodules
    ours, ref = MLP(fused, spec), MLP(unfused, spec)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    # MLP returns (output, fc2 bias) when it leaves the bias add to the caller (skip_bias_add)
    out, expected = (sum(t for t in mlp(x) if t is not None) for mlp in (ours, ref))
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    for a, e in zip(
        torch.autograd.grad(out, [x, *ours.parameters()], g),
        torch.autograd.grad(expected, [x, *ref.parameters()], g),
        strict=True,
    ):
        assert torch.equal(a, e)


def test_sdpa_attention_matches_megatrons_on_packed_rows():
    """flanpipe.model.gpt's fused attention equals Megatron's local DotProductAttention (float rounding)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from flanpipe.model.gpt import init_single_process, sdpa_core_attention, transformer_config
    from flanpipe.train.rows import attention_mask

    init_single_process()
    config = transformer_config(ModelConfig(**{**MODEL, "num_query_groups": 2}))
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, ref = sdpa_core_attention()(**args), DotProductAttention(**args)
    gen = torch.Generator().manual_seed(0)
    s, b = 12, 2
    q = torch.randn(s, b, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(s, b, 2, 16, generator=gen, requires_grad=True) for _ in range(2))  # GQA: 2 groups
    segments = torch.tensor([[1] * 5 + [2] * 4 + [0] * 3, [3] * 12])  # two documents + pads; one
    mask = attention_mask(segments)
    for m in (mask, None):  # packed rows; None: plain causal (evaluation)
        out, expected = ours(q, k, v, m), ref(q, k, v, m)
        assert out.shape == expected.shape == (s, b, 64)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
        g = torch.randn(out.shape, generator=gen)
        for a, e in zip(
            torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g), strict=True
        ):
            assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)


def test_tuning_scores_only_the_trained_positions_with_the_same_loss_and_gradients():
    """forward_step runs the output layer and cross entropy on the loss-carrying positions alone
    (gpt.logits_at): the loss sum, the token count and every gradient equal the full forward's."""
    from megatron.core.utils import get_attr_wrapped_model

    from flanpipe.model.gpt import init_single_process
    from flanpipe.train.loop import forward_step, output_layer, target_positions
    from flanpipe.train.rows import training_batch

    init_single_process()
    torch.manual_seed(0)
    model = model_provider(ModelConfig(**MODEL))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 64, (3, 16), generator=gen)
    segments = torch.tensor([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16, [4] * 9 + [5] * 7])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0] * 10 + [1] * 6, [0] * 7 + [1] * 9])
    batch = training_batch(tokens, segments, loss_mask)
    trained = int((batch["loss_mask"] != 0).sum())
    assert 0 < trained < tokens.numel()

    def run(cut: bool) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if cut:
            output, finish = forward_step(iter([batch]), model)
            assert output.shape == (trained, 1)  # one cross entropy per trained position, none elsewhere
        else:  # the plain call: logits and cross entropy at every position, then masked
            output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            finish = lambda out: (torch.sum(out.float() * batch["loss_mask"]), int(batch["loss_mask"].sum()))  # noqa: E731
        loss_sum, count = finish(output)[:2]
        loss_sum.backward()
        return loss_sum.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, cut = run(cut=False), run(cut=True)
    assert cut[1] == full[1] == trained
    assert torch.allclose(cut[0], full[0], rtol=1e-6, atol=1e-6), (cut[0], full[0])
    for name, grad in full[2].items():
        assert torch.allclose(cut[2][name], grad, rtol=1e-5, atol=1e-7), name

    # Rows trained everywhere (LM pretraining) and a stage without the output layer are left whole.
    head = get_attr_wrapped_model(model, "output_layer")
    assert output_layer(model) is head

    class Wrapper(torch.nn.Module):  # as Megatron's DDP and Float16Module hold the GPTModel: ``.module``
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    assert output_layer(Wrapper(Wrapper(model))) is head
    assert output_layer(Wrapper(torch.nn.Linear(2, 2))) is None  # a pipeline stage without the output layer
    ones = torch.ones_like(batch["loss_mask"])
    assert target_positions(batch["labels"], ones, head)[2] is None
    assert target_positions(batch["labels"], batch["loss_mask"], None)[2] is None
    labels, mask, (rows, cols) = target_positions(batch["labels"], batch["loss_mask"], head)
    assert labels.shape == mask.shape == rows.shape == cols.shape == (trained, 1)
    assert torch.equal(labels[:, 0], batch["labels"][batch["loss_mask"] != 0])


def test_a_train_job_alone_in_the_dag_gets_every_core():
    from flanpipe.core.threads import train_job_threads

    init = {"base": None, "nli": "base", "sentiment": "base"}
    assert train_job_threads(2, "base", init) == 2  # both tuned runs wait for it
    assert train_job_threads(2, "nli", init) == 1  # nli and sentiment train side by side
    assert train_job_threads(8, "sentiment", init) == 4
    assert train_job_threads(8, "only", {"only": None}) == 8
    assert train_job_threads(2, "b", {"a": None, "b": "a", "c": "b"}) == 2  # a chain: one at a time
    assert train_job_threads(1, "x", {"x": None, "y": None}) == 1  # never 0


def test_adafactor_switches_from_config_to_optimizer():
    """train.adafactor: schema defaults = today's Adafactor, the spec carries it, the optimizer gets it,
    and only a non-default setting changes the checkpoint fingerprint (older checkpoints stay resumable)."""
    from flanpipe.core import train_config
    from flanpipe.core.train_config import ADAFACTOR_DEFAULTS
    from flanpipe.model.gpt import init_single_process
    from flanpipe.plan.config import load_config, train_ops, train_spec
    from flanpipe.train.optim import build_optimizer

    config = load_config(REPO / "config" / "config.yaml")
    assert config["train"]["adafactor"] == ADAFACTOR_DEFAULTS == {"scale_parameter": True, "relative_step": True}
    off = {**config, "train": {**config["train"], "adafactor": {"scale_parameter": False, "relative_step": False}}}
    _, tc_off = parse_spec(train_spec(off, MODEL), train_ops(off))
    assert tc_off.adafactor == {"scale_parameter": False, "relative_step": False}
    tc = TrainConfig.from_dict({**TRAIN, "adafactor": {"relative_step": False}})
    assert tc.adafactor == {"scale_parameter": True, "relative_step": False}  # missing switch: its default
    with pytest.raises(ValueError, match="unknown train.adafactor keys"):
        TrainConfig.from_dict({**TRAIN, "adafactor": {"warmup_init": True}})

    init_single_process()
    optimizer = build_optimizer([torch.nn.Linear(3, 2)], lr=0.1, adafactor=tc.adafactor)
    assert all(not g["relative_step"] and g["scale_parameter"] for g in optimizer.optimizer.param_groups)

    default = TrainConfig.from_dict(TRAIN)
    before = {k: v for k, v in vars(default).items() if k != "adafactor"}  # a spec from before the switches

    def fp(train):  # noqa: ANN001, ANN202
        return train_config.fingerprint(train_config.fingerprint_parts(MODEL, train, data="d"))

    assert fp(vars(default)) == fp(before)
    assert fp(vars(tc)) != fp(before)


@pytest.fixture(scope="module")
def megatron_init_run(tmp_path_factory, megatron_packed_dir):
    """A short in-process run (TP=1/PP=1, 1-process gloo group): (model chunks, stats, out dir)."""
    out = tmp_path_factory.mktemp("init_run")
    model, stats = train(make_spec(steps=2), megatron_packed_dir, out)
    return model, stats, out


def test_in_process_run_writes_outputs_and_scorer_reloads_it(megatron_init_run):
    model, stats, out = megatron_init_run
    assert (out / "checkpoint" / "metadata.json").exists()
    assert load_model_config(out / "model.json") == ModelConfig(**MODEL)
    assert stats["steps"] == 2 and stats["tokens"] == 2 * 8 * 32
    assert json.loads((out / "done.json").read_text()) == pytest.approx(stats)

    scorer = load_scorer(out)
    in_memory = model[0].module.eval()
    ids = torch.randint(3, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = in_memory(ids, torch.arange(20).expand(3, 20), None)
    got = scorer.logits(ids)
    assert got.shape == (3, 20, 64) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-6


@pytest.fixture(scope="module")
def megatron_tp1_run(tmp_path_factory, megatron_packed_dir, megatron_init_run):
    """30 steps under torchrun with 1 rank, starting from the in-process run's weights.

    Checkpoints every 3 steps, all kept: iter_0000003 is the 2-rank runs' reference weights.
    """
    out = tmp_path_factory.mktemp("tp1") / "run"
    spec = make_spec(init_checkpoint=str(megatron_init_run[2]), save_interval=3, keep_checkpoints=10)
    done = torchrun(1, spec, megatron_packed_dir, out)
    return done, out


def test_torchrun_training_learns_the_task(megatron_tp1_run, megatron_init_run):
    done, out = megatron_tp1_run
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert set(log[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in log)
    # TensorBoard events from rank 0: the same losses as the log.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 31))
    assert np.allclose([e.value for e in events.Scalars("train/loss")], [r["loss"] for r in log])
    assert {"perf/mfu", "perf/tokens_per_s", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.8 * first, (first, last)
    assert done["first_loss"] == log[0]["loss"] and done["final_loss"] == log[-1]["loss"]
    assert done["tokens"] == 30 * 8 * 32 and done["wall_s"] > 0
    assert (out / "checkpoint" / "metadata.json").exists() and (out / "model.json").exists()

    # The saved model scores unseen examples of the task better than its starting point.
    held_out = counting_examples(32, vocab=64, seed=99)
    scorer = load_scorer(out)
    assert mean_target_loss(scorer, held_out) < mean_target_loss(load_scorer(megatron_init_run[2]), held_out)

    # Evaluation loads it in a fresh process (no training state, no RNG tracker): same logits.
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0]])
    code = (
        "import sys, torch; from flanpipe.model.gpt import load_scorer; "
        "torch.save(load_scorer(sys.argv[1]).logits(torch.load(sys.argv[2])), sys.argv[3])"
    )
    torch.save(ids, out.parent / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(out.parent / "ids.pt"), str(out.parent / "logits.pt")],
        cwd=REPO,
        check=True,
        timeout=120,
    )
    assert torch.equal(torch.load(out.parent / "logits.pt"), scorer.logits(ids))


def full_weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def global_batch_loss(model, data_dir: Path, step: int) -> float:
    """Token-mean loss of ``model`` (TP=1, in-process) on the global batch of 0-based ``step``."""
    from flanpipe.train.rows import PackedDataset, batch_iterator

    g, mb = TRAIN["global_batch_size"], TRAIN["micro_batch_size"]
    batches = batch_iterator(
        PackedDataset(data_dir), seed=TRAIN["seed"], global_batch_size=g, micro_batch_size=mb, consumed_samples=step * g
    )
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for _ in range(g // mb):
            b = next(batches)
            per_token = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
            loss_sum += (per_token.double() * b["loss_mask"]).sum().item()
            tokens += b["loss_mask"].sum().item()
    return loss_sum / tokens


@pytest.mark.parametrize(
    ("name", "tp", "pp", "nproc"), [("tp2", 2, 1, 2), ("pp2", 1, 2, 2), ("dp2", 1, 1, 2), ("tp2pp2", 2, 2, 4)]
)
def test_multi_rank_layouts_match_single_rank(
    name, tp, pp, nproc, tmp_path_factory, megatron_packed_dir, megatron_init_run, megatron_tp1_run
):
    """Same start, same data: TP=2 / PP=2 / DP=2 / TP=2 x PP=2 (4 processes on 2 cores: slow, not
    wrong) reproduce the 1-rank losses and weights.

    Three steps, so the optimizer state matters: Adafactor's factored statistics are reduced
    over the TP group (flanpipe.train.optim), so TP=2 matches too (torch.optim.Adafactor drifted
    by ~3e-4 after one step). The 2-rank weights are gathered by loading their checkpoint at TP=1.
    """
    from flanpipe.model.checkpointing import load_model_weights

    spec = make_spec(
        steps=3,
        save_interval=2,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        init_checkpoint=str(megatron_init_run[2]),
    )
    out = tmp_path_factory.mktemp(name) / "run"
    done = torchrun(nproc, spec, megatron_packed_dir, out)
    assert done["world_size"] == nproc and done["data_parallel_size"] == (2 if name == "dp2" else 1)
    reference = read_log(megatron_tp1_run[1])
    log = read_log(out)
    for step in range(3):
        assert abs(log[step]["loss"] - reference[step]["loss"]) < 1e-5, (step, log[step], reference[step])
        assert abs(log[step]["grad_norm"] - reference[step]["grad_norm"]) < 1e-4

    # Weights after 3 steps: this layout's shards, gathered at TP=1, against the 1-rank run's.
    scorer = load_scorer(out)  # a checkpoint saved at any layout loads in one process
    cfg = ModelConfig(**MODEL)
    ref_model = model_provider(cfg)
    load_model_weights(ref_model, megatron_tp1_run[1].with_name("run.ckpt") / "iter_0000003")
    ours, ref = full_weights(scorer.model.state_dict()), full_weights(ref_model.state_dict())
    assert ours.keys() == ref.keys()
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, worst

    # The resumable checkpoint saved at this layout after step 2 (model + optimizer) loads its
    # weights at TP=1 and gives the loss this layout logged at step 3 (computed with them).
    model = model_provider(cfg)
    load_model_weights(model, out.with_name("run.ckpt") / "iter_0000002")
    assert abs(global_batch_loss(model, megatron_packed_dir, step=2) - log[2]["loss"]) < 1e-6


# --------------------------------------------------------------------------- interleaved pipeline

MODEL4 = {**MODEL, "num_layers": 4}  # PP=2 x VPP=2: four chunks of one layer


def test_interleaved_pipeline_matches_single_rank(tmp_path_factory, megatron_packed_dir):
    """PP=2 with 2 model chunks per rank (Megatron's interleaved 1F1B: rank 0 holds layers 0 and 2,
    rank 1 layers 1 and 3) reproduces the 1-rank run from the same weights: losses, grad norms,
    and the final weights, gathered by loading the interleaved checkpoint into one unsplit model."""
    from flanpipe.model.checkpointing import load_model_weights

    base = tmp_path_factory.mktemp("vpp")
    init_spec = {"model": dict(MODEL4), "train": {**TRAIN, "steps": 1}}
    train(init_spec, megatron_packed_dir, base / "init")  # in-process: the shared starting weights
    spec = {"model": dict(MODEL4), "train": {**TRAIN, "steps": 3, "init_checkpoint": str(base / "init")}}
    torchrun(1, spec, megatron_packed_dir, base / "ref")
    interleaved = {
        **spec,
        "train": {**spec["train"], "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
    }
    done = torchrun(2, interleaved, megatron_packed_dir, base / "vpp")
    assert done["virtual_pipeline_model_parallel_size"] == 2 and done["pipeline_model_parallel_size"] == 2
    ref, log = read_log(base / "ref"), read_log(base / "vpp")
    for step in range(3):
        assert abs(log[step]["loss"] - ref[step]["loss"]) < 1e-5, (step, log[step], ref[step])
        assert abs(log[step]["grad_norm"] - ref[step]["grad_norm"]) < 1e-4
    ours = full_weights(load_scorer(base / "vpp").model.state_dict())
    theirs = full_weights(load_scorer(base / "ref").model.state_dict())
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-5
    # the resumable checkpoint holds both chunks per rank: its weights load unsplit too
    model = model_provider(ModelConfig(**MODEL4))
    load_model_weights(model, base / "vpp.ckpt" / "iter_0000003")
    got = full_weights(model.state_dict())
    assert max((got[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-5


def test_interleaved_layout_arithmetic_is_checked() -> None:
    from flanpipe.core.train_config import RankGrid

    cfg4 = ModelConfig(**MODEL4)
    tc = TrainConfig.from_dict({**TRAIN, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2})
    assert plan_layout(tc, cfg4, 2) == RankGrid(world=2, tp=1, pp=2, dp=1, accumulation=2, vpp=2)
    with pytest.raises(ValueError, match="x virtual_pipeline_model_parallel_size=2 must divide num_layers=2"):
        plan_layout(tc, ModelConfig(**MODEL), 2)
    # 8 rows / (micro 4 x dp 1) = 2 micro-batches: fine for pp 2; micro 8 -> 1, not a multiple of 2
    one_mb = TrainConfig.from_dict({**tc.__dict__, "micro_batch_size": 8})
    with pytest.raises(ValueError, match=r"micro-batches per step \(1 = .*multiple of pipeline_model_parallel_size=2"):
        plan_layout(one_mb, cfg4, 2)
    no_pp = TrainConfig.from_dict({**TRAIN, "virtual_pipeline_model_parallel_size": 2})
    with pytest.raises(ValueError, match="needs pipeline_model_parallel_size >= 2"):
        plan_layout(no_pp, cfg4, 1)


# --------------------------------------------------------------------------- bf16


def test_bf16_trains_with_fp32_master_weights_and_resumes_exactly(tmp_path, megatron_packed_dir, megatron_init_run):
    """bf16 mixed precision, as on a GPU (bf16 parameters and activations, fp32 master weights in the
    optimizer, fp32 grad reduction), run on the CPU: it follows the fp32 run to bf16 accuracy, its
    optimizer steps on fp32 masters, and a run stopped at step 2 and continued to 4 ends bitwise
    equal to an uninterrupted one (the masters are in the checkpoint)."""
    from flanpipe.model.checkpointing import load_model_weights
    from flanpipe.train.optim import master_weights

    init = str(megatron_init_run[2])
    spec = make_spec(steps=4, precision="bf16", init_checkpoint=init)
    model, stats = train(spec, megatron_packed_dir, tmp_path / "bf16")
    assert stats["precision"] == "bf16"
    params = list(model[0].parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    _, fp32 = train(make_spec(steps=4, init_checkpoint=init), megatron_packed_dir, tmp_path / "fp32")
    ref, log = read_log(tmp_path / "fp32"), read_log(tmp_path / "bf16")
    for a, b in zip(ref, log, strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.02 * a["loss"], (a, b)  # bf16 keeps 8 mantissa bits
    assert log[-1]["loss"] < log[0]["loss"]

    # interrupted at 2 then continued (more steps keep the fingerprint: the run resumes)
    train({**spec, "train": {**spec["train"], "steps": 2}}, megatron_packed_dir, tmp_path / "split")
    resumed, stats2 = train(spec, megatron_packed_dir, tmp_path / "split")
    assert stats2["resumed_from_step"] == 2
    whole = {k: v for k, v in model[0].module.state_dict().items() if isinstance(v, torch.Tensor)}
    parts = {k: v for k, v in resumed[0].module.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(whole[k], parts[k]) for k in whole)

    # the masters are fp32 and not the bf16 weights rounded back: they carry the low bits
    from flanpipe.train.optim import build_optimizer

    opt = build_optimizer(resumed, lr=1e-2, bf16=True)
    masters = [p for g in master_weights(opt) for p in g]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    fresh = model_provider(ModelConfig(**MODEL))  # fp32 model: the bf16 checkpoint loads into it
    load_model_weights(fresh, tmp_path / "split.ckpt" / "iter_0000004")
    assert all(v.dtype == torch.float32 for v in full_weights(fresh.state_dict()).values())
