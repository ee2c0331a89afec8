"""Text for STN language models: a Penn-Treebank-format loader, a corpus that ships with Python,
and a HyperLSTM language model whose dropouts an STN tunes (MacKay et al. 2019, §5).

Penn Treebank format (Mikolov et al. 2010, as distributed with the RNNLM toolkit): one sentence
per line, tokens separated by spaces, rare words already replaced by ``<unk>``; each line ends
with an ``<eos>`` token. The character-level files use one character per token and ``_`` for a
word boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from ..errors import DataError
from .layers import HyperDropout, HyperEmbedding, HyperLinear, HyperLSTM, STNSequential

EOS, UNK = "<eos>", "<unk>"


def read_ptb_tokens(path: str | Path) -> list[str]:
    """Tokens of one Penn-Treebank-format file: each line's tokens, then <eos> (Mikolov et al. 2010)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Penn Treebank file {str(path)!r} does not exist")
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words:
                tokens += words + [EOS]
    if not tokens:
        raise DataError(f"Penn Treebank file {str(path)!r} holds no tokens")
    return tokens


def load_ptb(folder: str | Path, prefix: str = "ptb.", level: str = "word"
             ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Train/valid/test token ids and the vocabulary (built from train) of a PTB-format folder.

    Files: ``{prefix}train.txt``, ``{prefix}valid.txt``, ``{prefix}test.txt`` (``level="char"``:
    ``{prefix}char.train.txt`` ...). A token of valid/test missing from train maps to <unk> when
    the vocabulary has it, else is an error naming it.
    """
    if level not in ("word", "char"):
        raise DataError(f"level must be 'word' or 'char', got {level!r}")
    folder = Path(folder)
    mid = "char." if level == "char" else ""
    files = {s: folder / f"{prefix}{mid}{s}.txt" for s in ("train", "valid", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"Penn Treebank folder {str(folder)!r} lacks {missing}")
    tokens = {s: read_ptb_tokens(p) for s, p in files.items()}
    vocab = sorted(set(tokens["train"]))
    index = {w: i for i, w in enumerate(vocab)}
    out = {}
    for split, toks in tokens.items():
        unknown = [w for w in dict.fromkeys(toks) if w not in index]
        if unknown and UNK not in index:
            raise DataError(f"{files[split]} has token(s) {unknown[:5]} that the training file "
                            f"does not, and the vocabulary has no {UNK!r} to map them to")
        unk = index.get(UNK, -1)
        out[split] = torch.tensor([index.get(w, unk) for w in toks], dtype=torch.int64)
    return out, vocab


def python_corpus(max_chars: int | None = None) -> str:
    """English prose that ships with CPython: the pydoc topic help texts (pydoc_data.topics)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - stripped Python builds
        raise DataError("this Python has no pydoc_data package to take a corpus from") from e
    text = "\n".join(topics[k] for k in sorted(topics))
    return text if max_chars is None else text[:max_chars]


def char_splits(text: str, fractions: Sequence[float] = (0.9, 0.05, 0.05)
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Character ids of contiguous train/valid/test slices of `text` and the character vocabulary."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n = len(ids)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return {"train": ids[:a], "valid": ids[a:b], "test": ids[b:]}, vocab


def windows(ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets) of non-overlapping windows of `length` tokens."""
    n = (len(ids) - 1) // length
    if n < 1:
        raise DataError(f"a split of {len(ids)} tokens is too short for windows of {length}")
    x = ids[:n * length].view(n, length)
    y = ids[1:n * length + 1].view(n, length)
    return x, y


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of (B, T, V) logits."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def hyper_lstm_lm(vocab_size: int, n_hparams: int, embed: int = 64, hidden: int = 128,
                  dropouts: Sequence[str] = ("dropout_emb", "dropout_in", "dropout_hid",
                                             "dropout_out"),
                  centred: bool = True, seed: int | None = None, dtype=None) -> STNSequential:
    """Embedding -> dropout -> HyperLSTM (input and variational hidden dropout) -> dropout -> logits."""
    emb_d, in_d, hid_d, out_d = dropouts

    def build():
        return STNSequential([
            HyperEmbedding(vocab_size, embed, n_hparams, zero_init=centred, dtype=dtype),
            HyperDropout(emb_d),
            HyperLSTM(embed, hidden, n_hparams, input_dropout=in_d, hidden_dropout=hid_d,
                      zero_init=centred, dtype=dtype),
            HyperDropout(out_d),
            HyperLinear(hidden, vocab_size, n_hparams, zero_init=centred, dtype=dtype),
        ], centred=centred)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


__all__ = ["read_ptb_tokens", "load_ptb", "python_corpus", "char_splits", "windows", "lm_loss",
           "hyper_lstm_lm"]
