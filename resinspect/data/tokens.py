"""Language-model data: token sequences for next-token prediction (task ``next-token``).

- ``induction``: generated. Each sequence is ``p`` uniformly random tokens followed by the same tokens again
  (Olsson et al. 2022's repeated random tokens). Nothing before the repeat can be predicted (loss log V),
  every token of the repeat after its first can, by copying from the earlier occurrence: the in-context loss
  drop on the repeat is the induction signature. The period ``p`` is drawn per sequence (a fixed one would
  let a network copy from a fixed offset, which is not induction); ``period=P`` fixes it.
- ``text``: a local UTF-8 file, or a folder of ``.txt`` files, given with ``--data-root``; byte-level tokens
  (vocabulary 256), cut into sequences of ``length + 1`` bytes; the first ``1 - test_fraction`` of the bytes
  train, the rest test (a fixed split by position, no shuffling across it). With ``tokenizer=<folder or hub
  id>`` (given automatically for an ``hf:`` model: its own) the text is cut into that tokenizer's tokens
  instead, read offline.

Each item is ``(tokens, next_tokens)``: ``tokens = s[:-1]``, ``next_tokens = s[1:]`` of a sequence ``s`` of
``length + 1`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..errors import DataError
from .bundle import DataBundle

__all__ = ["load_induction", "load_text", "induction_sequences", "repeat_start", "byte_names"]


def repeat_start(length: int) -> int:
    """The first input position of the repeated half in an ``induction`` sequence of ``length`` inputs: from
    there on, every next token is a copy of the token after the input's earlier occurrence."""
    return (length + 2) // 2


def induction_sequences(
    n: int, length: int, vocab: int, generator: torch.Generator, period: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``length + 1`` tokens, each ``p`` random tokens repeated (cut to ``length + 1``), and
    their periods ``p``: ``period`` for all, or (``period=0``) each drawn uniformly from
    ``[length // 4, repeat_start(length)]``, so that no fixed positional offset predicts the repeat and only
    induction (finding the earlier occurrence of the current token) does."""
    h = repeat_start(length)
    lo = max(1, min(h, length // 4))
    periods = (
        torch.full((n,), period, dtype=torch.long) if period else torch.randint(lo, h + 1, (n,), generator=generator)
    )
    first = torch.randint(0, vocab, (n, h), generator=generator)
    idx = torch.arange(length + 1).unsqueeze(0) % periods.unsqueeze(1)
    return first.gather(1, idx), periods


def _split(seqs: torch.Tensor) -> TensorDataset:
    return TensorDataset(seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous())


def load_induction(
    vocab: int = 64, length: int = 64, train: int = 4096, test: int = 512, seed: int = 0, period: int = 0
) -> DataBundle:
    """Repeated random token sequences (see the module docstring); ``length`` inputs per sequence; ``period``
    fixes the repeat's period for every sequence (``repeat_start(length)``: exactly "the second half repeats
    the first"), 0 draws it per sequence."""
    if period and not 1 <= period <= repeat_start(length):
        raise DataError(f"induction: period must lie in [1, {repeat_start(length)}] for length {length}, got {period}")
    if vocab < 2 or length < 3 or train < 1 or test < 1:
        raise DataError(
            f"induction needs vocab >= 2, length >= 3, train and test >= 1; got {vocab}, {length}, {train}, {test}"
        )
    g = torch.Generator().manual_seed(seed)
    (tr, tr_p), (te, te_p) = (induction_sequences(k, length, vocab, g, period) for k in (train, test))
    return DataBundle(
        name="induction",
        train=_split(tr),
        test=_split(te),
        in_channels=1,
        image_size=length,
        num_classes=vocab,
        class_names=[str(i) for i in range(vocab)],
        task="next-token",
        info={
            "vocab": vocab,
            "length": length,
            "period": period
            or f"{max(1, min(repeat_start(length), length // 4))}-{repeat_start(length)} (per sequence)",
            "test_periods": te_p.tolist() if test <= 4096 else None,
        },
    )


def byte_names() -> list[str]:
    """Readable names of the 256 byte tokens: the character for printable ASCII, else ``\\xNN``."""
    return [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in range(256)]


def _read_text(root: str) -> tuple[bytes, list[str]]:
    path = Path(root).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"text: folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"text: {path} does not exist (give a UTF-8 file or a folder of .txt files with --data-root)")
    parts = []
    for f in files:
        raw = f.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"text: {f} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        parts.append(raw)
    return b"\n".join(parts), [str(f) for f in files]


def load_text(
    root: str = "data",
    length: int = 64,
    test_fraction: float = 0.1,
    download: bool = False,
    limit_train: int = 0,
    limit_test: int = 0,
    tokenizer: str = "",
) -> DataBundle:
    """Byte-level sequences of a local UTF-8 file or folder of ``.txt`` files (see the module docstring);
    ``limit_train`` / ``limit_test`` keep the first sequences of each split (0: all). ``tokenizer`` names a
    Hugging Face tokenizer (a folder, or a hub id in the local cache) to use instead of bytes; an ``hf:`` model
    passes its own. Nothing is downloaded: ``download`` is refused."""
    if download:
        raise DataError("text: nothing to download; give a local UTF-8 file or folder with --data-root")
    if not 0 < test_fraction < 1:
        raise DataError(f"text: test_fraction must lie in (0, 1), got {test_fraction}")
    raw, files = _read_text(root)
    unit = "bytes" if not tokenizer else "tokens"
    if tokenizer:
        from ..models.hf import hf_tokenizer

        tok = hf_tokenizer(tokenizer)
        vocab = len(tok)
        tokens = torch.tensor(tok(raw.decode("utf-8"), add_special_tokens=False)["input_ids"], dtype=torch.long)
        names = [str(t) for t in tok.convert_ids_to_tokens(list(range(vocab)))]
    else:
        vocab, names = 256, byte_names()
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - test_fraction))
    step = length + 1
    parts = []
    for name, piece in (("train", tokens[:cut]), ("test", tokens[cut:])):
        n = len(piece) // step
        if n < 1:
            raise DataError(
                f"text: {root} has {len(tokens)} {unit}, too few for one {name} sequence of {step} {unit} "
                f"(test_fraction {test_fraction}); give more text or a smaller length"
            )
        limit = limit_train if name == "train" else limit_test
        parts.append(piece[: n * step].reshape(n, step)[: limit or None])
    return DataBundle(
        name="text",
        train=_split(parts[0]),
        test=_split(parts[1]),
        in_channels=1,
        image_size=length,
        num_classes=vocab,
        class_names=names,
        task="next-token",
        info={
            "vocab": vocab,
            "length": length,
            unit: len(tokens),
            "files": len(files),
            "tokenizer": tokenizer or "bytes",
        },
    )
