"""The tokenizer that comes with a checkpoint, behind one small interface.

A pretrained model only works with its own ids, so tokenize, pack and evaluate must use the
checkpoint's tokenizer: an HF ``tokenizer.json`` (read by the ``tokenizers`` library: Llama 3,
Qwen2, GPT-2) or a SentencePiece ``tokenizer.model`` (Llama 2, Mistral). EOS and pad ids come from
the checkpoint's ``tokenizer_config.json`` / ``generation_config.json`` / ``config.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flanpipe.core.io import read_json_object


class Tokenizer(Protocol):
    """What flanpipe's stages need from a tokenizer (``flanpipe.data.tokenize.open_tokenizer`` returns one).

    ``encode``/``encode_batch`` with ``add_special=True`` give the ids a model sees for a prompt: what
    ``transformers``' ``tokenizer(text)["input_ids"]`` gives (e.g. Llama's BOS first). Targets are
    encoded with ``add_special=False`` and end in ``eos_id`` (see ``flanpipe.data.tokenize``).
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    add_bos: bool
    source: Path

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(
        self, texts: list[str], add_special: bool = True, num_threads: int | None = None
    ) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_batch(self, rows: list[list[int]]) -> list[str]: ...


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON side file ({} when absent); a broken one names itself."""
    return read_json_object(path) if path.exists() else {}


@dataclass
class HFTokenizer:
    """A checkpoint's tokenizer. ``encode`` adds what the checkpoint's tokenizer adds by default
    (e.g. Llama's BOS), so ids equal ``transformers``' ``tokenizer(text)["input_ids"]``."""

    backend: Any
    kind: str  # "tokenizers" or "sentencepiece"
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    add_bos: bool
    source: Path

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return list(self.backend.encode(text).ids)
        return self.encode_batch([text])[0]

    def encode_batch(
        self, texts: list[str], add_special: bool = True, num_threads: int | None = None
    ) -> list[list[int]]:
        """``encode`` of each text, in the backend's native threads (the data path's bulk call).

        ``tokenizers`` sizes its pool from RAYON_NUM_THREADS, which ``flanpipe.core.threads`` sets to the
        job's budget; SentencePiece takes ``num_threads``. ``add_special=False``: the bare text ids.
        """
        if self.kind == "tokenizers":
            # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never read: ~20% less CPU
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(list(texts), add_special_tokens=add_special)]
        # transformers reads a tokenizer.model as a Metaspace pre-tokenizer that prepends '▁' only when
        # the text does not already start with a space; SentencePiece's dummy prefix is unconditional,
        # so one leading space is dropped here to give transformers' ids (a per-text check, not per token)
        rows = self.backend.encode(
            [t[1:] if t.startswith(" ") else t for t in texts], out_type=int, num_threads=num_threads
        )
        if " " in texts:  # a lone space is the lone piece '▁' there, nothing here once its space is dropped
            space = [self.backend.piece_to_id("\u2581")]
            rows = [space if t == " " else r for t, r in zip(texts, rows, strict=True)]
        if add_special and self.add_bos and self.bos_id is not None:
            return [[self.bos_id, *r] for r in rows]
        return rows

    def decode(self, ids: list[int]) -> str:
        if self.kind == "tokenizers":
            return self.backend.decode(list(ids), skip_special_tokens=True)
        return self.backend.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        """``decode`` of each row (one native call for ``tokenizers``)."""
        if self.kind == "tokenizers":
            return self.backend.decode_batch([list(r) for r in rows], skip_special_tokens=True)
        return [self.decode(r) for r in rows]


def _special_id(name: str | None, lookup) -> int | None:  # noqa: ANN001
    return None if name is None else lookup(name)


def load_hf_tokenizer(directory: str | os.PathLike[str]) -> HFTokenizer:
    """The tokenizer in ``directory`` (``tokenizer.json`` preferred over ``tokenizer.model``).

    EOS: tokenizer_config.json's eos_token, else generation_config.json's / config.json's eos_token_id.
    Pad: its pad_token if set, else EOS (decoder-only checkpoints usually ship without one; flanpipe
    masks padded positions out of the loss, so which id fills them does not matter).
    """
    d = Path(directory)
    tcfg = _read_json(d / "tokenizer_config.json")
    names = {k: _token_name(tcfg.get(k)) for k in ("eos_token", "pad_token", "bos_token")}
    if (d / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFBackend

        source = d / "tokenizer.json"
        try:
            backend = HFBackend.from_file(str(source))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise ValueError(f"{source}: not a tokenizers tokenizer.json: {e}") from None
        kind = "tokenizers"
        lookup = backend.token_to_id
        vocab = backend.get_vocab_size(with_added_tokens=True)
    elif (d / "tokenizer.model").exists():
        import sentencepiece as spm

        source = d / "tokenizer.model"
        try:
            backend = spm.SentencePieceProcessor(model_file=str(source))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{source}: not a SentencePiece model: {e}") from None
        kind = "sentencepiece"

        def lookup(piece: str) -> int | None:
            i = backend.piece_to_id(piece)
            return None if i == backend.unk_id() and piece != backend.id_to_piece(i) else i

        vocab = backend.get_piece_size()
    else:
        raise FileNotFoundError(f"{d}: no tokenizer.json or tokenizer.model")
    ids = {k: _special_id(v, lookup) for k, v in names.items()}
    missing = {k: names[k] for k, i in ids.items() if names[k] is not None and i is None}
    if missing:  # a foreign tokenizer file beside this config: its ids would silently mean other tokens
        named = ", ".join(f"{k} {v!r}" for k, v in missing.items())
        raise ValueError(
            f"{d / 'tokenizer_config.json'} names {named}, which {source} does not have (its vocabulary of {vocab} "
            "lacks it): the tokenizer file is not this checkpoint's, or the config names the wrong token"
        )
    fallback_path = d / "generation_config.json" if (d / "generation_config.json").exists() else d / "config.json"
    fallback = _read_json(fallback_path)
    eos = ids["eos_token"]
    if eos is None:
        eos = fallback.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is not None and not 0 <= int(eos) < vocab:
            raise ValueError(f"{fallback_path}: eos_token_id {eos} is not an id of {source} (0..{vocab - 1})")
    if eos is None:
        raise ValueError(f"{d}: no EOS token in tokenizer_config.json, generation_config.json or config.json")
    bos = ids["bos_token"]
    if bos is None and kind == "sentencepiece":
        bos = backend.bos_id() if backend.bos_id() >= 0 else None
    add_bos = bool(tcfg.get("add_bos_token", kind == "sentencepiece"))
    if add_bos and bos is None:
        raise ValueError(
            f"{d / 'tokenizer_config.json'}: add_bos_token is true but {source} has no BOS token "
            "(set bos_token to one of its tokens, or add_bos_token: false)"
        )
    pad = ids["pad_token"] if ids["pad_token"] is not None else eos
    return HFTokenizer(backend, kind, vocab, int(eos), int(pad), bos, add_bos, source)
