"""flanpipe.optim.Adafactor: torch.optim.Adafactor's step, made invariant to tensor-parallel sharding.

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

from flanpipe.optim import Adafactor

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


def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        init, grads = _trajectory()
        sharded = _run(Adafactor, init, grads, LRS, rank=rank, tp=world, tp_group=dist.group.WORLD)
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
