"""flanpipe.train.optim.Adafactor: torch.optim.Adafactor's step, made invariant to tensor-parallel sharding.

Two checks, both without Megatron's model: one process against torch.optim.Adafactor, and two
gloo processes each holding half of every sharded tensor (the way Megatron's TP layers mark
them) against one process holding the full tensors. The end-to-end TP=2 training check is
tests/test_train.py::test_two_rank_layouts_match_single_rank.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flanpipe.train.optim import Adafactor

# (name, full shape, TP partition dim or None for a replicated parameter)
PARAMS = [
    ("column_parallel_weight", (8, 6), 0),  # QKV / fc1 / embedding / output layer: rows split
    ("row_parallel_weight", (6, 8), 1),  # proj / fc2: columns split
    ("column_parallel_bias", (8,), 0),
    ("replicated_norm", (6,), None),
    ("replicated_matrix", (4, 6), None),
]
STEPS = 4


def _trajectory(seed: int = 0):
    """Initial weights and per-step grads (full tensors), identical in every process."""
    g = torch.Generator().manual_seed(seed)
    init = {name: 0.02 * torch.randn(shape, generator=g) for name, shape, _ in PARAMS}
    # Grads of varied scale per row/column, so the factored statistics are far from uniform.
    grads = [
        {name: torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3 for name, shape, _ in PARAMS}
        for _ in range(STEPS)
    ]
    return init, grads


def _run(optimizer_cls, init, grads, lrs, *, rank: int = 0, tp: int = 1, **kwargs):
    """Step ``optimizer_cls`` over this rank's slices; return this rank's final slices."""
    params = {}
    for name, _, dim in PARAMS:
        full = init[name]
        local = full if dim is None else full.chunk(tp, dim=dim)[rank]
        p = torch.nn.Parameter(local.clone())
        if dim is not None:
            p.tensor_model_parallel, p.partition_dim = True, dim  # as Megatron marks TP shards
        params[name] = p
    decay = [params[n] for n, _, _ in PARAMS if params[n].dim() > 1]
    rest = [params[n] for n, _, _ in PARAMS if params[n].dim() == 1]
    opt = optimizer_cls([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], **kwargs)
    for step_grads, lr in zip(grads, lrs, strict=True):
        for name, _, dim in PARAMS:
            full = step_grads[name]
            params[name].grad = (full if dim is None else full.chunk(tp, dim=dim)[rank]).clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return {name: p.detach().clone() for name, p in params.items()}


LRS = [1e-2, 3e-2, 0.5, 0.5]  # the last two exceed 1/sqrt(t): the relative step is capped


def test_single_process_matches_torch_adafactor():
    init, grads = _trajectory()
    ours = _run(Adafactor, init, grads, LRS)
    ref = _run(torch.optim.Adafactor, init, grads, LRS, foreach=False)
    for name, _, _ in PARAMS:
        diff = (ours[name] - ref[name]).abs().max().item()
        assert diff <= 1e-6, (name, diff)
        assert not torch.equal(ours[name], init[name])  # it moved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, out_dir: str, switches: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        init, grads = _trajectory()
        switches = switches or {}
        sharded = _run(Adafactor, init, grads, LRS, rank=rank, tp=world, tp_group=dist.group.WORLD, **switches)
        unaware = _run(torch.optim.Adafactor, init, grads, LRS, rank=rank, tp=world, foreach=False)
        torch.save((sharded, unaware), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_shards_equal_the_full_tensor_step(tmp_path):
    """TP=2 (gloo, 2 processes) == TP=1 within fp32 rounding; torch's per-shard Adafactor is not."""
    init, grads = _trajectory()
    full = _run(Adafactor, init, grads, LRS)
    mp.start_processes(_tp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(2)}
    worst_unaware = 0.0
    for name, _, dim in PARAMS:
        if dim is None:
            gathered = results[0][0][name]
            assert torch.equal(results[0][0][name], results[1][0][name])  # replicas stay identical
        else:
            gathered = torch.cat([results[r][0][name] for r in range(2)], dim=dim)
            unaware = torch.cat([results[r][1][name] for r in range(2)], dim=dim)
            worst_unaware = max(worst_unaware, (unaware - full[name]).abs().max().item())
        diff = (gathered - full[name]).abs().max().item()
        assert diff < 1e-7, (name, diff)
    assert worst_unaware > 1e-5  # the statistics really are shard-dependent without the reductions


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"d": 0.5}, {"beta2_decay": 0.1}, {"weight_decay": -1.0}])
def test_rejects_bad_hyperparameters(bad):
    with pytest.raises(ValueError):
        Adafactor([torch.nn.Parameter(torch.zeros(2))], **bad)


# --------------------------------------------------------------------------- switches

# One step from theta on a tiny vector and a tiny matrix, written out. At t = 1, 1 - beta2_1 = 1^-0.8 = 1,
# so the second moment is the gradient squared itself: vector v = g^2; matrix G^2 = [[1, 4], [4, 16]]
# is rank 1, so r = mean_c = [2.5, 10], c = mean_r = [2.5, 10], V = r c / mean(r) = r c / 6.25 = G^2.
# Then U = G / sqrt(V) = sign(G) and RMS(U) = 1, so nothing is clipped (d = 1): theta -= alpha_1 sign(G).
# lr = 2 > 1/sqrt(1) = 1, so the relative-step cap shows:
#   rho_1 = min(2, 1) = 1 (relative_step) or lr = 2;
#   alpha_1 = max(1e-3, RMS(theta)) x rho_1 (scale_parameter) or rho_1, with
#   RMS(vector) = sqrt((0.3^2 + 0.4^2) / 2) = sqrt(0.125),
#   RMS(matrix) = sqrt((2 x 0.1^2 + 2 x 0.2^2) / 4) = sqrt(0.025).
VEC, VEC_GRAD = [0.3, -0.4], [2.0, -0.5]
MAT, MAT_GRAD = [[0.1, 0.2], [0.2, 0.1]], [[1.0, 2.0], [2.0, 4.0]]


@pytest.mark.parametrize(
    ("scale_parameter", "relative_step", "alpha_vec", "alpha_mat"),
    [
        (True, True, 0.125**0.5 * 1.0, 0.025**0.5 * 1.0),  # FLAN's / torch's Adafactor (the default)
        (True, False, 0.125**0.5 * 2.0, 0.025**0.5 * 2.0),
        (False, True, 1.0, 1.0),
        (False, False, 2.0, 2.0),
    ],
)
def test_switches_one_step_by_hand(scale_parameter, relative_step, alpha_vec, alpha_mat):
    vec, mat = torch.nn.Parameter(torch.tensor(VEC)), torch.nn.Parameter(torch.tensor(MAT))
    vec.grad, mat.grad = torch.tensor(VEC_GRAD), torch.tensor(MAT_GRAD)
    opt = Adafactor([vec, mat], lr=2.0, scale_parameter=scale_parameter, relative_step=relative_step)
    opt.step()
    want_vec = torch.tensor(VEC) - alpha_vec * torch.tensor(VEC_GRAD).sign()
    want_mat = torch.tensor(MAT) - alpha_mat * torch.tensor(MAT_GRAD).sign()
    assert torch.allclose(vec.detach(), want_vec, rtol=0, atol=1e-6), (vec, want_vec)
    assert torch.allclose(mat.detach(), want_mat, rtol=0, atol=1e-6), (mat, want_mat)


def test_defaults_are_both_switches_on_and_old_state_dicts_load():
    """The default is the behaviour before the switches existed, and a state dict saved then (its param
    groups lack the keys) resumes with both on."""
    init, grads = _trajectory()
    default = _run(Adafactor, init, grads, LRS)
    explicit = _run(Adafactor, init, grads, LRS, scale_parameter=True, relative_step=True)
    assert all(torch.equal(default[n], explicit[n]) for n in default)
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adafactor([p], scale_parameter=False, relative_step=False)
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["scale_parameter"], group["relative_step"]
    opt.load_state_dict(old)
    assert opt.param_groups[0]["scale_parameter"] is True and opt.param_groups[0]["relative_step"] is True


def test_two_shards_equal_the_full_tensor_step_with_switches_off(tmp_path):
    """scale_parameter and relative_step off (no RMS(theta) reduction, lr uncapped): TP=2 == TP=1 still."""
    switches = {"scale_parameter": False, "relative_step": False}
    init, grads = _trajectory()
    full = _run(Adafactor, init, grads, LRS, **switches)
    default = _run(Adafactor, init, grads, LRS)
    assert any(not torch.equal(full[n], default[n]) for n in full)  # the switches change the trajectory
    mp.start_processes(_tp_worker, args=(2, _free_port(), str(tmp_path), switches), nprocs=2, start_method="spawn")
    results = {r: torch.load(tmp_path / f"rank{r}.pt")[0] for r in range(2)}
    for name, _, dim in PARAMS:
        if dim is None:
            assert torch.equal(results[0][name], results[1][name])
            gathered = results[0][name]
        else:
            gathered = torch.cat([results[r][name] for r in range(2)], dim=dim)
        # steps of lr = 0.5 (uncapped, unscaled) move weights to O(1): fp32 rounding there is ~1e-7
        diff = (gathered - full[name]).abs().max().item()
        assert diff < 1e-6, (name, diff)
