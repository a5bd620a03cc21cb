"""Packed rows -> training batches, checked against brute-force references and the model itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pack_examples, write_packed

from flanpipe.data.row_order import sample_rows
from flanpipe.train.rows import (
    PackedDataset,
    attention_mask,
    batch_iterator,
    microbatch_rows,
    plain_causal,
    position_ids,
    training_batch,
)

SEGMENTS = torch.tensor(
    [
        [1, 1, 1, 2, 2, 3, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 2, 2, 2, 3, 3, 3, 0],
    ]
)


def test_position_ids_restart_per_segment():
    expected = torch.tensor(
        [
            [0, 1, 2, 0, 1, 0, 0, 1],
            [0, 1, 2, 3, 4, 5, 6, 7],
            [0, 0, 1, 2, 0, 1, 2, 0],
        ]
    )
    assert torch.equal(position_ids(SEGMENTS), expected)


def test_attention_mask_is_block_diagonal_causal():
    mask = attention_mask(SEGMENTS)
    b, s = SEGMENTS.shape
    assert mask.shape == (b, 1, s, s) and mask.dtype == torch.bool
    for r in range(b):
        for i in range(s):
            for j in range(s):
                seg_i, seg_j = int(SEGMENTS[r, i]), int(SEGMENTS[r, j])
                if seg_i == 0:
                    allowed = i == j  # a pad sees only itself
                else:
                    allowed = seg_i == seg_j and j <= i
                assert bool(mask[r, 0, i, j]) == (not allowed), (r, i, j)
    assert not mask.all(dim=-1).any(), "no query row may be fully masked"


def test_only_rows_of_one_whole_document_go_without_a_mask():
    """forward_step passes no mask (the model's causal default) exactly when the dense mask is plain causal."""
    assert plain_causal(attention_mask(SEGMENTS[1:2]))  # one document filling the row
    assert plain_causal(attention_mask(torch.tensor([[4] * 8, [1] * 8])))  # any segment id
    assert not plain_causal(attention_mask(SEGMENTS))  # packed documents and pads
    assert not plain_causal(attention_mask(torch.tensor([[1] * 6 + [0] * 2])))  # pads see only themselves


def test_label_mask_and_labels_exact():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 0], [11, 12, 13, 14, 15, 16, 17]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2, 2]])
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 1, 1]])
    batch = training_batch(tokens, segments, loss_mask)
    assert torch.equal(batch["labels"], torch.tensor([[6, 7, 8, 9, 10, 0, 0], [12, 13, 14, 15, 16, 17, 0]]))
    # label_mask[i] = loss_mask[i+1] & seg[i+1] == seg[i] != 0, last column 0.
    # Row 0, i=2: next token 8 starts segment 2 -> not trained. Row 1, i=3: next token 15 is an
    # input token of segment 2 -> not trained; i=4 predicts 16 (target, same segment) -> trained.
    expected = torch.tensor([[1, 1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0]], dtype=torch.float32)
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["loss_mask"], expected)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}


def test_packed_dataset_roundtrip(tmp_path):
    examples = [([3, 4, 5], [6, 1]), ([7, 8], [9, 10, 1]), ([11], [12, 1]), ([13, 14, 15, 16], [17, 1])]
    tokens, segments, loss_mask = pack_examples(examples, 8)
    ds = PackedDataset(write_packed(tmp_path / "p", tokens, segments, loss_mask))
    assert len(ds) == len(tokens) and ds.seq_length == 8
    for i in range(len(ds)):
        row = ds[i]
        assert np.array_equal(row["tokens"], tokens[i])
        assert np.array_equal(row["segments"], segments[i])
        assert np.array_equal(row["loss_mask"], loss_mask[i])
    stacked = ds.rows(np.array([2, 0]))
    assert torch.equal(stacked["tokens"], torch.from_numpy(tokens[[2, 0]]))


def test_packed_dataset_rejects_mismatched_prefixes(tmp_path):
    tokens, segments, loss_mask = pack_examples([([3, 4], [5, 1])] * 6, 8)
    write_packed(tmp_path / "p", tokens, segments, loss_mask)
    write_packed(tmp_path / "q", tokens[:-1], segments[:-1], loss_mask[:-1])
    for name in ("segments.bin", "segments.idx"):
        (tmp_path / "p" / name).write_bytes((tmp_path / "q" / name).read_bytes())
    with pytest.raises(ValueError, match="row counts differ"):
        PackedDataset(tmp_path / "p")


def test_sample_stream_is_epoch_permutations():
    n = 10
    stream = sample_rows(n, seed=3, start=0, count=3 * n)
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])
    assert np.array_equal(sample_rows(n, seed=3, start=7, count=9), stream[7:16])


def test_microbatches_partition_global_batch_and_resume():
    n, gbs, mbs, dp = 13, 8, 2, 2  # accumulation = 8 / (2 x 2) = 2
    per_rank = [
        microbatch_rows(n, seed=1, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]
    for step in range(4):
        got = np.concatenate([np.concatenate([next(it) for _ in range(2)]) for it in per_rank])
        assert np.array_equal(got, sample_rows(n, seed=1, start=step * gbs, count=gbs))
    # Resuming after 3 steps continues the same stream.
    fresh = microbatch_rows(n, seed=1, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=1, dp_size=dp)
    for _ in range(3 * 2):
        next(fresh)
    resumed = microbatch_rows(
        n, seed=1, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=1, dp_size=dp, consumed_samples=3 * gbs
    )
    for _ in range(4):
        assert np.array_equal(next(fresh), next(resumed))
    with pytest.raises(ValueError, match="micro_batch_size"):
        next(microbatch_rows(n, seed=1, global_batch_size=6, micro_batch_size=4, dp_rank=0, dp_size=1))


def test_batch_iterator_yields_training_batches(megatron_packed_dir):
    ds = PackedDataset(megatron_packed_dir)
    batch = next(batch_iterator(ds, seed=0, global_batch_size=4, micro_batch_size=2))
    assert batch["tokens"].shape == (2, ds.seq_length)
    assert batch["attention_mask"].shape == (2, 1, ds.seq_length, ds.seq_length)
    assert batch["loss_mask"].sum() > 0


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_packed_forward_matches_separate_examples(position_embedding_type):
    """A packed row's logits equal running each of its examples alone (the point of the mask)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from flanpipe.core.model_config import ModelConfig
    from flanpipe.model.gpt import init_single_process, model_provider

    init_single_process()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        vocab_size=64,
        max_position_embeddings=24,
        position_embedding_type=position_embedding_type,
    )
    model = model_provider(cfg).eval()
    rng = np.random.default_rng(0)
    examples = [
        (rng.integers(3, 64, 4).tolist(), rng.integers(3, 64, 3).tolist() + [1]),
        (rng.integers(3, 64, 6).tolist(), [1]),
        (rng.integers(3, 64, 2).tolist(), rng.integers(3, 64, 5).tolist() + [1]),
    ]
    tokens, segments, loss_mask = pack_examples(examples, 24)
    assert tokens.shape[0] == 1 and segments.max() == 3 and (segments == 0).any()
    batch = training_batch(*(torch.from_numpy(a) for a in (tokens, segments, loss_mask)))
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        for seg, (inputs, targets) in enumerate(examples, start=1):
            ids = torch.tensor([inputs + targets])
            alone = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
            cols = torch.from_numpy(segments[0] == seg)
            assert (packed[0, cols] - alone[0]).abs().max().item() < 1e-5


def test_thd_packing_metadata_lets_each_token_see_what_the_dense_mask_does():
    """The GPU (Transformer Engine) path replaces the dense block-diagonal mask with THD cu_seqlens
    over the flattened micro-batch. Causal attention within each [cu[k], cu[k+1]) interval must give
    every real token exactly the keys the CPU mask gives it (pads, which carry no loss, may differ)."""
    from flanpipe.train.rows import packed_seq_params

    b, s = SEGMENTS.shape
    params = packed_seq_params(SEGMENTS)
    cu = params.cu_seqlens_q
    assert params.qkv_format == "thd" and torch.equal(cu, params.cu_seqlens_kv) and cu.dtype == torch.int32
    assert int(cu[0]) == 0 and int(cu[-1]) == b * s and bool((cu[1:] > cu[:-1]).all())
    assert params.max_seqlen_q == int((cu[1:] - cu[:-1]).max())
    seq_of = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    flat = torch.arange(b * s)
    thd_allowed = (seq_of[:, None] == seq_of[None, :]) & (flat[None, :] <= flat[:, None])
    dense_allowed = ~attention_mask(SEGMENTS)[:, 0]  # [b, s, s]
    for r in range(b):
        for i in range(s):
            if int(SEGMENTS[r, i]) == 0:
                continue
            row = thd_allowed[r * s + i].reshape(b, s)
            assert not row[torch.arange(b) != r].any(), "a THD sequence never crosses rows"
            assert torch.equal(row[r], dense_allowed[r, i]), (r, i)
