"""The layout planner's arithmetic, checked against numbers worked out by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flanpipe.core.model_config import ModelConfig, load_model_config, param_count
from flanpipe.train.planner import (
    GIB,
    Hardware,
    Layout,
    Workload,
    activation_bytes_per_layer,
    adafactor_state_elements,
    bubble_fraction,
    evaluate_layout,
    format_plan,
    global_batch_rows,
    matmul_params,
    model_flops_per_step,
    plan,
    recompute_flops_per_step,
    stage_memory_bytes,
    step_time_s,
)

MODELS = Path(__file__).resolve().parents[1] / "config" / "models"

# A made-up model small enough to add up by hand: L=4, h=64, a=4 heads of 16, f=256, V=128, LayerNorm.
SMALL = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=256,
    vocab_size=128,
    max_position_embeddings=32,
)


def test_small_model_param_count() -> None:
    # per layer: 2 LayerNorms 2 x 128 = 256; qkv 64*192 + 192 = 12,480; proj 64*64 + 64 = 4,160;
    # fc1 64*256 + 256 = 16,640; fc2 256*64 + 64 = 16,448  ->  49,984; x 4 layers = 199,936
    # + embedding 128*64 = 8,192 + final norm 128 + output 128*64 = 8,192  ->  216,448
    assert param_count(SMALL) == 216_448
    # FLOP-bearing params exclude the embedding lookup: 216,448 - 8,192 = 208,256
    assert matmul_params(SMALL) == 208_256


def test_137b_param_count_and_flops() -> None:
    cfg = load_model_config(MODELS / "lamda_pt_137b.yaml")
    # per layer (head dim 64 as written): 4 * 8192^2 + 3 * 8192 * 65536 = 1,879,048,192
    # + biases 3h + h + 2f + h = 172,032 + RMSNorm gains 2h = 16,384  ->  1,879,236,608
    per_layer = 4 * 8192**2 + 3 * 8192 * 65536 + (3 * 8192 + 8192 + 2 * 65536 + 8192) + 2 * 8192
    assert per_layer == 1_879_236_608
    if cfg.kv_channels == 64:  # until ModelConfig can say 128 heads of 128 (see the config's comment)
        # 64 layers + embedding 32000*8192 + output 32000*8192 + final norm 8192
        assert param_count(cfg) == 64 * per_layer + 2 * 32000 * 8192 + 8192 == 120_795_439_104
        # 6 * N * T with N = 120,795,439,104 - 262,144,000 (lookup) = 120,533,295,104 and T = 8 x 1024 = 8192:
        #   6 * 120,533,295,104 * 8192 = 5,924,452,520,951,808
        # attention 12 * L * s * d * T = 12 * 64 * 1024 * 8192 * 8192 = 52,776,558,133,248
        assert model_flops_per_step(cfg, 8192, 1024) == 5_924_452_520_951_808 + 52_776_558_133_248
    assert 115e9 < param_count(cfg) < 145e9


def test_activation_formula_reduces_to_megatrons_34() -> None:
    # GPT shape (d = h, f = 4h, no GLU): s*b*h*(34 + 5*a*s/h); s=2048, b=2, h=1024, a=16 -> 5*16*2048/1024 = 160
    s, b, h, a = 2048, 2, 1024, 16
    assert activation_bytes_per_layer(s, b, h, a, h, 4 * h) == s * b * h * (34 + 160)
    # selective recompute keeps only the 34*s*b*h part
    assert activation_bytes_per_layer(s, b, h, a, h, 4 * h, recompute="selective") == 34 * s * b * h
    # GLU stores 8 B per MLP-width element instead of 4: 10 + 8 + 8*4 = 50 instead of 34
    assert activation_bytes_per_layer(s, b, h, a, h, 4 * h, gated=True, recompute="selective") == 50 * s * b * h
    with pytest.raises(ValueError, match="recompute"):
        activation_bytes_per_layer(s, b, h, a, h, 4 * h, recompute="full")


def test_memory_components_small_model() -> None:
    # TP=2, PP=2, DP=1, micro-batch 1, s=32, m=4 micro-batches.
    layout = Layout(tp=2, pp=2, dp=1, micro_batch_size=1)
    first = stage_memory_bytes(SMALL, layout, 0, seq_length=32, m=4)
    # stage 0 = 2 layers + embedding = 2 * 49,984 + 8,192 = 108,160 params, / TP 2 = 54,080 per GPU
    assert first["weights"] == 2 * 54_080  # bf16
    assert first["grads"] == 4 * 54_080  # fp32 main grads
    assert first["master_weights"] == 4 * 54_080  # fp32 master copy
    # Adafactor rows + cols per TP shard (d = 64, f = 256, t = 2):
    #   qkv [96, 64] -> 160; proj [64, 32] -> 96; fc1 [128, 64] -> 192; fc2 [64, 128] -> 192  = 640
    #   vectors: qkv bias 96 + proj bias 64 + fc1 bias 128 + fc2 bias 64 + 2 LayerNorms 256 = 608
    #   2 layers x 1,248 = 2,496 + embedding shard [64, 64] -> 128  = 2,624 fp32 = 10,496 B
    assert adafactor_state_elements(SMALL, 2, 2, 0) == 2_624
    assert first["optimizer_state"] == 10_496
    # activations per layer: 34 * s*b*h + 5*a*s^2*b = 34*32*64 + 5*4*32*32 = 69,632 + 20,480 = 90,112
    # / TP 2 = 45,056 x 2 layers x min(PP=2, m=4) = 2 in flight  ->  180,224
    assert first["activations"] == 180_224
    assert first["logits"] == 0
    assert sum(first.values()) == 731_520

    last = stage_memory_bytes(SMALL, layout, 1, seq_length=32, m=4)
    # stage 1 = 2 layers + final norm 128 + output 8,192 = 108,288 params -> 54,144 per GPU
    assert last["weights"] == 2 * 54_144
    # 1 micro-batch in flight on the last stage: 45,056 x 2 layers x 1
    assert last["activations"] == 90_112
    # logits: (4*s*b*h + 4*s*b*V) / TP = (8,192 + 16,384) / 2
    assert last["logits"] == 12_288

    # ZeRO-1 over DP=2 halves master weights and optimizer state only
    zero = stage_memory_bytes(SMALL, Layout(2, 2, 2, 1), 0, seq_length=32, m=2, distributed_optimizer=True)
    assert zero["master_weights"] == 2 * 54_080 and zero["optimizer_state"] == 10_496 // 2


def test_adafactor_state_is_tiny_next_to_adam() -> None:
    cfg = load_model_config(MODELS / "lamda_pt_137b.yaml")
    adafactor = 4 * adafactor_state_elements(cfg, 1, 1, 0)
    adam = 8 * param_count(cfg)
    assert adafactor < 1e-3 * adam  # O(rows + cols) vs O(rows * cols)


def test_bubble_fraction() -> None:
    assert bubble_fraction(1, 1) == 0.0  # no pipeline, no bubble
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)  # (2-1) / (4+2-1)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)  # (4-1) / (8+4-1)
    assert bubble_fraction(8, 1) == pytest.approx(7 / 8)


def test_flops_and_step_time() -> None:
    # T = 4 rows x 32 = 128 tokens; 6 * 208,256 * 128 = 159,940,608
    # attention: 12 * L * s * d * T = 12 * 4 * 32 * 64 * 128 = 12,582,912
    flops = model_flops_per_step(SMALL, 128, 32)
    assert flops == 159_940_608 + 12_582_912 == 172_523_520
    # selective recompute re-runs QK^T and AV forward: 4 * 4 * 32 * 64 * 128 = 4,194,304
    assert recompute_flops_per_step(SMALL, 128, 32, "selective") == 4_194_304
    assert recompute_flops_per_step(SMALL, 128, 32, "none") == 0
    # 4 GPUs x 1 TFLOP/s x MFU 0.5 = 2e12 FLOP/s: 172,523,520 / 2e12 = 86.26 us, / (1 - 0.2) = 107.83 us
    assert step_time_s(flops, 4, 1.0, 0.5, 0.2) == pytest.approx(1.0782720e-4)


def test_evaluate_layout_small_model_end_to_end() -> None:
    hw = Hardware(gpus=4, gpu_mem_gib=1.0, gpus_per_node=4, peak_tflops=1.0, mfu=0.5)
    wl = Workload(batch_tokens=128, seq_length=32, steps=1000)
    c = evaluate_layout(SMALL, hw, wl, Layout(tp=2, pp=2, dp=1, micro_batch_size=1))
    assert c["num_microbatches"] == 4 and c["worst_stage"] == 0
    assert c["memory_gib"]["total"] * GIB == pytest.approx(731_520)
    assert c["bubble_fraction"] == pytest.approx(0.2)
    assert c["step_time_s"] == pytest.approx(1.0782720e-4)
    assert c["total_hours"] == pytest.approx(1000 * 1.0782720e-4 / 3600)
    assert c["feasible"] and c["reasons"] == []


def test_batch_must_be_whole_rows() -> None:
    assert global_batch_rows(8192, 1024) == 8
    # FLAN's 8,192 tokens in rows of 1,024 + 256 = 1,280 would be 6.4 rows
    with pytest.raises(ValueError, match=r"6\.4 rows.*7680 \(6 x 1280\) or 8960 \(7 x 1280\)"):
        global_batch_rows(8192, 1280)


def test_infeasible_layouts_are_marked() -> None:
    # memory: stage 0 of TP2 x PP2 needs 731,520 B; give each GPU 0.0006 GiB = 644,245 B
    hw = Hardware(gpus=4, gpu_mem_gib=0.0006, gpus_per_node=4)
    c = evaluate_layout(SMALL, hw, Workload(batch_tokens=128, seq_length=32), Layout(2, 2, 1, 1))
    assert not c["feasible"] and "GiB per GPU" in c["reasons"][0]
    # batch: 4 rows cannot split over DP = 8 GPUs / (TP1 x PP1)
    hw8 = Hardware(gpus=8, gpus_per_node=8)
    p = plan(SMALL, hw8, Workload(batch_tokens=128, seq_length=32))
    dp8 = [c for c in p["candidates"] if c["dp"] == 8]
    assert dp8 and all(not c["feasible"] and "does not split over DP=8" in c["reasons"][0] for c in dp8)


def test_recommendation() -> None:
    wl = Workload(batch_tokens=128, seq_length=32)
    # Plenty of memory: TP1/PP1/DP4, TP2/DP2 and TP4/DP1 all have no bubble and the same step time;
    # the tie goes to the fewest model-parallel GPUs.
    roomy = plan(SMALL, Hardware(gpus=4, gpus_per_node=4), wl)
    r = roomy["recommended"]
    assert (r["tp"], r["pp"], r["dp"], r["micro_batch_size"], r["recompute"]) == (1, 1, 4, 1, "none")
    # 2,000,000 B per GPU: TP1/PP1 needs 2,581,248 B (all 216,448 params x 10 B + activations): out.
    # TP2/PP1/DP2 needs 1,296,256 B and has no bubble; TP1/PP2 fits too (1,457,664 B) but idles.
    tight = plan(SMALL, Hardware(gpus=4, gpus_per_node=4, gpu_mem_gib=2_000_000 / GIB), wl)
    r = tight["recommended"]
    assert (r["tp"], r["pp"], r["dp"], r["micro_batch_size"], r["recompute"]) == (2, 1, 2, 1, "none")
    assert r["memory_gib"]["total"] * GIB == pytest.approx(1_296_256)
    # nothing fits: no recommendation, and the plan says so
    none = plan(SMALL, Hardware(gpus=4, gpus_per_node=4, gpu_mem_gib=1e-6), wl)
    assert none["recommended"] is None and "no feasible layout" in none["notes"][-1]
    assert "recommended: none" in format_plan(none)


def test_137b_on_h100s_recommends_a_feasible_layout() -> None:
    cfg = load_model_config(MODELS / "lamda_pt_137b.yaml")
    for gpus in (128, 256):
        p = plan(cfg, Hardware(gpus=gpus), Workload())
        r = p["recommended"]
        assert r is not None and r["feasible"] and r["tp"] * r["pp"] * r["dp"] == gpus
        assert r["tp"] <= 8 and 64 % r["pp"] == 0 and r["memory_gib"]["total"] <= 80
        # 8 rows per step cap DP at 8
        assert r["dp"] <= 8


def test_cli_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    from flanpipe.cli import main

    main(["plan", "--model", str(MODELS / "lamda_pt_137b.yaml"), "--gpus", "128", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert {"candidates", "recommended", "model", "hardware", "workload", "assumptions", "notes"} <= set(out)
    assert out["workload"]["global_batch_rows"] == 8
    with pytest.raises(SystemExit):
        main(["plan", "--model", "lamda_pt_137b", "--gpus", "128", "--seq-length", "1280"])
    assert "6.4 rows" in capsys.readouterr().err


def test_interleaved_bubble_and_activation_arithmetic() -> None:
    from flanpipe.train.planner import in_flight_chunks

    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)  # (4-1) / (2*8 + 4-1)
    assert bubble_fraction(2, 4, 2) == pytest.approx(1 / 9)
    # Megatron's warm-up on rank 0 of PP=4, VPP=2: 2*(4-0-1) + (2-1)*4 = 10 forwards, + 1 in flight
    assert in_flight_chunks(4, 8, 0, 2) == 11 and in_flight_chunks(4, 8, 3, 2) == 5
    assert in_flight_chunks(4, 1, 0, 2) == 2  # never more than VPP x m chunk-micro-batches exist
    # SMALL (4 layers) at TP2 x PP2, m = 4: 1F1B holds 2 micro-batches x 2 layers = 4 layer-activations on
    # stage 0; VPP=2 holds 2*(2-1) + 2 + 1 = 5 chunk-micro-batches x 1 layer = 5: 1.25 x, bubble 1/5 -> 1/9
    hw = Hardware(gpus=4, gpu_mem_gib=1.0, gpus_per_node=4, peak_tflops=1.0, mfu=0.5)
    wl = Workload(batch_tokens=128, seq_length=32, steps=1000)
    plain = evaluate_layout(SMALL, hw, wl, Layout(tp=2, pp=2, dp=1, micro_batch_size=1))
    inter = evaluate_layout(SMALL, hw, wl, Layout(tp=2, pp=2, dp=1, micro_batch_size=1, vpp=2))
    assert inter["vpp"] == 2 and inter["bubble_fraction"] == pytest.approx(1 / 9)
    assert inter["memory_gib"]["activations"] == pytest.approx(1.25 * plain["memory_gib"]["activations"])
    assert inter["step_time_s"] == pytest.approx(plain["step_time_s"] * (1 - 0.2) / (1 - 1 / 9))


def test_interleaved_layouts_are_offered_only_where_megatron_runs_them() -> None:
    from flanpipe.train.planner import enumerate_layouts

    hw = Hardware(gpus=4, gpu_mem_gib=1.0, gpus_per_node=4)
    layouts = enumerate_layouts(SMALL, hw, rows=4)
    inter = [lay for lay in layouts if lay.vpp > 1]
    assert inter, "PP=2 with 4 layers and m = 4 rows / (DP x mb) even: interleaving is a candidate"
    for lay in inter:
        m = 4 // (lay.dp * lay.micro_batch_size)
        assert lay.pp > 1 and SMALL.num_layers % (lay.pp * lay.vpp) == 0 and m % lay.pp == 0


def test_eval_memory_and_layout_for_lamda_137b() -> None:
    from flanpipe.train.planner import GIB, eval_memory_bytes, last_stage_extra_params, per_layer_params, plan_eval

    cfg = load_model_config(MODELS / "lamda_pt_137b.yaml")
    mem = eval_memory_bytes(cfg, 8, 4, batch=32, seq_length=1280)
    # weights: the worst stage (16 layers + the untied output layer and final norm) / TP 8 x 2 B (bf16)
    assert mem["weights"] == (16 * per_layer_params(cfg) + last_stage_extra_params(cfg)) // 8 * 2
    assert 7.5 < mem["weights"] / GIB < 8.5  # ~138B / 32 GPUs x 2 B
    # KV cache: 2 x 16 layers x 32 x 1280 x 16384 / 8 x 2 B = 5 GiB
    assert mem["kv_cache"] == 2 * 16 * 32 * 1280 * 16384 // 8 * 2 == 5 * GIB
    p = plan_eval(cfg, gpu_mem_gib=80, batch=32, seq_length=1280)
    assert p["fits"] and p["memory_gib"]["total"] <= 80
    # one node, TP=8: 32 GiB of weights + 20 GiB of KV cache + 5 GiB of logits per GPU; training needs 32+ GPUs
    assert (p["tp"], p["pp"], p["gpus"]) == (8, 1, 8)
    assert 2 * param_count(cfg) / p["gpus"] / GIB < 80


def test_node_split_fills_nodes_evenly_with_whole_tp_groups() -> None:
    from flanpipe.train.planner import node_split, slurm_resources

    assert node_split(16, 2, tp=8) == 8  # one TP group of 8 per node
    assert node_split(128, 16, tp=8) == 8  # config/flan137b.yaml: TP8 x PP4 x DP4
    with pytest.raises(ValueError, match="do not fill 3 nodes evenly"):
        node_split(2, 3)
    with pytest.raises(ValueError, match="split a tensor-parallel group of 4"):
        node_split(12, 2, tp=4)  # 6 ranks per node: the second TP group straddles both nodes
    # what `flanpipe plan` prints for profiles/slurm: as few nodes as hold the GPUs, evenly
    assert slurm_resources(128, 8, tp=8) == {"nodes": 16, "tasks": 128, "gpu": 128, "ranks_per_node": 8}
    assert slurm_resources(12, 8) == {"nodes": 2, "tasks": 12, "gpu": 12, "ranks_per_node": 6}
    assert slurm_resources(4, 8) == {"nodes": 1, "tasks": 4, "gpu": 4, "ranks_per_node": 4}
    with pytest.raises(ValueError, match="evenly"):
        slurm_resources(13, 8)


def test_plan_prints_the_profiles_nodes_and_tasks() -> None:
    from flanpipe.train.planner import enumerate_layouts

    cfg = load_model_config(MODELS / "lamda_pt_137b.yaml")
    p = plan(cfg, Hardware(gpus=128), Workload())
    assert p["slurm"] == {"nodes": 16, "tasks": 128, "gpu": 128, "ranks_per_node": 8}
    assert "set-resources train: nodes: 16, tasks: 128, gpu: 128 (8 ranks per node)" in format_plan(p)
    # 12 GPUs on 8-GPU nodes run as 2 x 6: no TP group of 4 or 8 is offered (it would cross nodes)
    assert {lay.tp for lay in enumerate_layouts(SMALL, Hardware(gpus=12, gpus_per_node=8), rows=12)} <= {1, 2}


def test_check_nodes_refuses_what_the_nodes_cannot_hold() -> None:
    from flanpipe.plan.config import ConfigError, check_nodes

    assert check_nodes("train", 16, 2, tp=8, mpi="srun") == 8
    assert check_nodes("train", 8, None, tp=8) == 8  # nodes unset: one node
    with pytest.raises(ConfigError, match="set-resources train: tasks=2, nodes=3"):
        check_nodes("train", 2, 3, tp=1, mpi="srun")
    with pytest.raises(ConfigError, match="train:mpi is empty"):
        check_nodes("train", 2, 2, tp=1, mpi="")  # torchrun --standalone cannot span nodes
    with pytest.raises(ConfigError, match="evaluate:nodes: want an integer"):
        check_nodes("evaluate", 2, "two", tp=1, mpi="srun")
