"""Evaluation at the scale a model trains: a Megatron GPTModel at any TP x PP layout, with a KV cache.

``ParallelLM`` is this rank's pipeline stage of the model. It answers flanpipe.eval.evaluate's ``Scorer``
protocol (``logits``: a cache-free full forward, for any caller) and adds incremental decoding with
Megatron-Core's own KV cache (``StaticInferenceContext`` + ``GPTModel.forward(inference_context=...)``):
``prefill`` encodes a prompt block, ``step`` one token per row, each reusing every key and value already
computed. Every TP and PP rank of a model replica runs the same calls on the same tokens: TP logits are
gathered by Megatron (``runtime_gather_output``), pipeline stages pass hidden states with point-to-point
sends, and the last stage broadcasts the logits over the pipeline group, so every rank of the replica
takes the same decisions. Data-parallel replicas score disjoint rows (flanpipe.eval.evaluate shards them).

Ragged prompts and the cache: Megatron's static cache keeps one write position for the whole batch
(``sequence_len_offset``). Rows keep right padding and their true positions, as in training: the batch
prefills the shortest prompt's length ``lo`` at once, then advances one position per step for every row;
a row still inside its prompt feeds its next prompt token (its logits are ignored), a row past it feeds
what it generated. At every step each row's cache therefore holds exactly its own tokens at positions
0..t, so a row's logits equal the cache-free forward of that row alone. Batches are sorted by length,
so the teacher-forced span (longest - shortest prompt of a batch) stays short.

Rank classification can share the input across its options (``share_prefix``): the examples' prompts
are prefilled once, the cache rows are then copied to one row per (example, option), and the option
tokens are scored one position per step. The prompt is encoded once instead of once per option, at the
price of one forward call per option position; that was slower on CPU for short options (see
ParallelLM), so by default a scorer that takes a block mask scores each example's input and all its options
in one packed row (flanpipe.eval.evaluate.option_logprobs_packed), and one that cannot (Transformer Engine's
spec) one full forward per (input, option) row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from flanpipe.core.model_config import ModelConfig
from flanpipe.eval.layout import check_eval_layout
from flanpipe.model import megatron_compat
from flanpipe.model.gpt import logits_at


def _right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int = 0) -> torch.LongTensor:
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):  # one copy per row, not per token
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _rope_at(rope: torch.nn.Module, positions: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Megatron RotaryEmbedding's angles at explicit positions [b, s] -> [s, b, 1, d] (its get_emb, per row)."""
    seq = positions.t().to(rope.inv_freq.dtype)
    if rope.seq_len_interpolation_factor is not None:
        seq = seq / rope.seq_len_interpolation_factor
    freqs = seq[..., None] * rope.inv_freq.to(seq.device)  # [s, b, d/2]
    if rope.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


class ParallelLM:
    """This rank's stage of a GPTModel replica (TP x PP ranks), scored with or without a KV cache."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, *, share_prefix: bool = False):
        from megatron.core import parallel_state as ps

        # Rank classification through the cache (option_logprobs_shared) instead of one full forward per
        # (input, option): fewer FLOPs, but one forward call per option position. On a shared, loaded 2-core
        # machine `flanpipe bench eval` measured it at 0.3x to 1.6x the full forward's examples/s on the
        # default's short options (call overhead vs FLOPs), so it is opt-in until a GPU measurement decides.
        self.share_prefix = share_prefix
        self.model = model.eval()
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        import torch.distributed as dist

        self.global_rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage()
        self.last = ps.is_pipeline_last_stage()
        if self.pp > 1:
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()
            self.pp_group = ps.get_pipeline_model_parallel_group()

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        ctx: Any,
        out_len: int,
        mask: torch.Tensor | None = None,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One forward through the pipeline; logits [b, out_len, V] (float32, CPU) on every PP rank, or with
        ``at`` = (rows [P, 1], cols [P, J]) only those positions' logits, [P, J, V] (gpt.logits_at)."""
        import torch.distributed as dist

        b, s = tokens.shape
        ids, pos = tokens.to(self.device), positions.to(self.device)
        if not self.first:
            hidden = torch.empty(s, b, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=self.prev_rank)
            self.model.set_input_tensor(hidden)
        # mask None: the spec's causal mask (prefill), none needed for one new token per row
        mask = None if mask is None else mask.to(self.device)
        cut = None if at is None or not self.last else tuple(t.to(self.device) for t in at)
        with logits_at(getattr(self.model, "output_layer", None), cut):
            out = self.model(ids, pos, mask, inference_context=ctx, runtime_gather_output=True)
        shape = (b, out_len) if at is None else tuple(at[1].shape)
        if not self.last:
            dist.send(out.contiguous(), dst=self.next_rank)
            logits = torch.empty(*shape, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        else:
            logits = out.float().contiguous()
        if self.pp > 1:
            dist.broadcast(logits, src=self.last_rank, group=self.pp_group)
        return logits.cpu()

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cache-free logits [b, s, V] of right-padded rows (the evaluate.Scorer protocol)."""
        b, s = tokens.shape
        if s > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {s} > max_position_embeddings")
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        return self._forward(tokens.long(), positions, None, s)

    @property
    def max_positions(self) -> int:
        """Positions the model has (max_position_embeddings): rank classification checks input + option against it."""
        return self.cfg.max_position_embeddings

    @property
    def takes_mask(self) -> bool:
        """Whether ``masked_logits`` honours an arbitrary mask: the local spec does; TE's causal attention
        would ignore it (evaluate.option_logprobs_packed needs it)."""
        return not getattr(self.model, "flanpipe_uses_te", False)

    @torch.no_grad()
    def masked_logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits [b, s, V] of rows with explicit positions and a bool mask [b, 1, s, s] (True = masked).

        ``at`` = (rows [P, 1], cols [P, J]): only the logits at (rows[p], cols[p, j]), [P, J, V]. Rank
        classification reads a few positions per row (each option token's predictor), and the output layer
        runs on those alone: on the default's few-shot prompts most of a row is input, whose logits no one reads.
        """
        if int(positions.max()) >= self.cfg.max_position_embeddings:
            raise ValueError("a position is past max_position_embeddings")
        rope = getattr(self.model, "rotary_pos_emb", None)
        if rope is None:  # learned absolute positions: the embedding reads ``positions`` itself
            return self._forward(tokens.long(), positions.long(), None, tokens.shape[1], mask, at)
        # GPTModel rotates by column, not by position_ids; for the duration of this call, this
        # instance's RoPE returns per-row angles [s, b, 1, d] (apply_rotary_pos_emb broadcasts over b)
        rope.forward = partial(_rope_at, rope, positions.to(self.device))
        try:
            return self._forward(tokens.long(), positions.long(), None, tokens.shape[1], mask, at)
        finally:
            del rope.forward

    def new_context(self, batch: int, max_len: int) -> Any:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` positions."""
        from megatron.core.inference.contexts import StaticInferenceContext

        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {max_len} > max_position_embeddings")
        return StaticInferenceContext(batch, max_len)

    @torch.no_grad()
    def prefill(self, ctx: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Encode [b, s] tokens at positions 0..s-1 into an empty cache; next-token logits [b, V]."""
        b, s = tokens.shape
        ctx.enable_prefill_mode()
        logits = self._forward(tokens.long(), torch.arange(s).unsqueeze(0).expand(b, s), ctx, 1)
        ctx.sequence_len_offset = s
        return logits[:, -1]

    @torch.no_grad()
    def step(self, ctx: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([b]) at the cache's next position; next-token logits [b, V]."""
        t = ctx.sequence_len_offset
        ctx.enable_decode_mode()
        logits = self._forward(tokens.long()[:, None], torch.full((tokens.shape[0], 1), t), ctx, 1)
        ctx.sequence_len_offset = t + 1
        return logits[:, -1]

    @staticmethod
    def take_rows(ctx: Any, index: torch.Tensor) -> None:
        """Keep (or repeat) cache rows: row i of the cache becomes old row index[i], in every layer."""
        for layer, (k, v) in ctx.key_value_memory_dict.items():
            ctx.key_value_memory_dict[layer] = (k[:, index].contiguous(), v[:, index].contiguous())
        ctx.max_batch_size = int(index.numel())


@torch.inference_mode()
def greedy_generate_cached(
    lm: ParallelLM, input_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, batch_size: int
) -> list[list[int]]:
    """Greedy continuation with the KV cache; same contract and result as evaluate.greedy_generate.

    Per batch (sorted by length): prefill the shortest prompt, then one position per step for every
    row (teacher-forcing the rest of longer prompts, see the module docstring). A row stops at EOS or
    after max_new_tokens; finished rows are dropped from the cache once a quarter of the batch is done.
    """
    if any(len(ids) == 0 for ids in input_ids):
        raise ValueError("greedy generation needs a non-empty input (no BOS token exists)")
    order = sorted(range(len(input_ids)), key=lambda k: -len(input_ids[k]))
    out: list[list[int]] = [[] for _ in input_ids]
    for start in range(0, len(order), batch_size):
        idx = torch.tensor(order[start : start + batch_size])
        lengths = torch.tensor([len(input_ids[k]) for k in idx.tolist()])
        lo, hi = int(lengths.min()), int(lengths.max())
        width = hi + max_new_tokens
        buf = _right_pad([input_ids[k] for k in idx.tolist()], width)
        n_new = torch.zeros(len(idx), dtype=torch.long)
        done = torch.zeros(len(idx), dtype=torch.bool)
        live = torch.arange(len(idx))  # batch rows still in the cache, in cache order
        ctx = lm.new_context(len(idx), width)
        logits = lm.prefill(ctx, buf[:, :lo])
        for t in range(lo, width):  # logits predict position t of every live row
            nxt = logits.argmax(-1)
            gen = (lengths[live] <= t) & ~done[live]  # rows whose position t is a new token
            rows = live[gen]
            stop = nxt[gen] == eos_id
            keep = rows[~stop]
            buf[keep, t] = nxt[gen][~stop]
            n_new[keep] += 1
            done[rows[stop]] = True
            done[keep[n_new[keep] >= max_new_tokens]] = True
            alive = ~done[live]
            if not alive.any() or t == width - 1:
                break
            if int(alive.sum()) <= 3 * live.numel() // 4:  # compact the cache
                lm.take_rows(ctx, alive.nonzero().squeeze(1))
                live = live[alive]
            logits = lm.step(ctx, buf[live, t])
        for j, k in enumerate(idx.tolist()):
            n = len(input_ids[k])
            out[k] = buf[j, n : n + int(n_new[j])].tolist()
    return out


@torch.inference_mode()
def option_logprobs_shared(
    lm: ParallelLM,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> tuple[list[list[float]], list[list[float]]]:
    """log p(option | input) summed over the option's tokens, and its last token's alone (evaluate.OptionLogprobs'
    fields); same contract as evaluate.option_logprobs.

    Examples (sorted by input length) are batched so that their (example, option) rows fit
    ``batch_size``. Their inputs are prefilled once up to the shortest input of the batch; the cache
    is then repeated into one row per option, and every row advances one position per step: row r
    with sequence x = input + option (lengths L <= T) adds log_softmax(logits at t-1)[x_t] for t in [L, T).
    """
    if len(input_ids) != len(options_ids):
        raise ValueError(f"{len(input_ids)} inputs but {len(options_ids)} option lists")
    if any(len(ids) == 0 for ids in input_ids):
        raise ValueError("rank classification needs a non-empty input (no BOS token exists)")
    if any(len(opt) == 0 for opts in options_ids for opt in opts):
        raise ValueError("every option needs at least one token")
    order = sorted(range(len(input_ids)), key=lambda k: -len(input_ids[k]))
    out: list[list[float]] = [[] for _ in input_ids]
    out_last: list[list[float]] = [[] for _ in input_ids]
    start = 0
    while start < len(order):
        batch = [order[start]]
        rows = len(options_ids[order[start]])
        while start + len(batch) < len(order) and rows + len(options_ids[order[start + len(batch)]]) <= batch_size:
            rows += len(options_ids[order[start + len(batch)]])
            batch.append(order[start + len(batch)])
        start += len(batch)
        seqs = [list(input_ids[k]) + list(opt) for k in batch for opt in options_ids[k]]
        example_of = torch.tensor([i for i, k in enumerate(batch) for _ in options_ids[k]])
        n_in = torch.tensor([len(input_ids[k]) for k in batch])[example_of]
        total = torch.tensor([len(s) for s in seqs])
        lo = min(len(input_ids[k]) for k in batch)
        width = int(total.max())
        buf = _right_pad(seqs, width)
        ctx = lm.new_context(len(batch), width)
        logits = lm.prefill(ctx, _right_pad([input_ids[k][:lo] for k in batch], lo))
        lm.take_rows(ctx, example_of)  # one cache row per (example, option)
        logits = logits[example_of]
        score = torch.zeros(len(seqs), dtype=torch.float64)
        last = torch.zeros(len(seqs), dtype=torch.float64)
        for t in range(lo, width):  # logits predict position t of every row
            scored = (n_in <= t) & (t < total)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, buf[:, t, None]).squeeze(1).double()
            score += torch.where(scored, logp, torch.zeros((), dtype=torch.float64))
            last = torch.where(t == total - 1, logp, last)
            if t == width - 1:
                break
            logits = lm.step(ctx, buf[:, t])
        scores, lasts = score.tolist(), last.tolist()
        r = 0
        for k in batch:
            out[k], out_last[k] = scores[r : r + len(options_ids[k])], lasts[r : r + len(options_ids[k])]
            r += len(options_ids[k])
    return out, out_last


def init_eval_parallel(tp: int, pp: int) -> None:
    """torch.distributed (torchrun's env, or one process) + Megatron's TP x PP groups, RNG tracker seeded."""
    from megatron.core import tensor_parallel

    from flanpipe.train.loop import init_distributed

    init_distributed(tp, pp)
    # Attention forks the model-parallel RNG around dropout even in eval mode: the tracker must exist.
    if "model-parallel-rng" not in tensor_parallel.get_cuda_rng_tracker().get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def load_parallel_lm(model_dir: str | os.PathLike[str], tp: int = 1, pp: int = 1) -> ParallelLM:
    """This rank's stage of the model in ``model_dir`` at TP x PP (dist_checkpointing reshards any saved
    layout); the process groups come from torchrun's environment, or a 1-process group."""
    from megatron.core import parallel_state as ps

    from flanpipe.core.model_config import load_model_config
    from flanpipe.model.checkpointing import load_weights
    from flanpipe.model.gpt import model_provider

    model_dir = Path(model_dir)
    megatron_compat.quiet_warnings()
    cfg = load_model_config(model_dir / "model.json")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_eval_layout(cfg, tp, pp, world)
    init_eval_parallel(tp, pp)
    model = model_provider(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                           tp=tp, pp=pp)  # fmt: skip
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    load_weights(model, model_dir / "checkpoint")
    return ParallelLM(model, cfg)
