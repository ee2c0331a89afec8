"""A vectorised rANS information buffer: one coder lane per element, last in, first out.

Each lane is a range-ANS coder (Duda 2013, "Asymmetric numeral systems") with an int64 head
kept in [2^31, 2^63); renormalisation moves 32-bit words between the heads and one shared
tensor tape. `push(s, base)` encodes a digit s < base, `pop(base)` decodes one, both with the
near-uniform distribution over [0, base) at 2^24 precision (a power-of-two base: exactly
uniform, as raw bits), and each is the exact inverse of the other, as bits-back coding
needs (Townsend, Bird & Barber 2019, "Practical lossless compression with latent variables
using bits back coding"). Words are written and read in lane order, so the tape is one flat
stack: a pop may take words another lane pushed, and the mirrored push puts them back.
Below the bottom of the tape lie zero words: a pop from an empty tape borrows them, so two tapes
that differ only in zero words at the bottom hold the same message.
"""

from __future__ import annotations

import torch

from ..errors import HyperdescentError

PRECISION_BITS = 24
PRECISION = 1 << PRECISION_BITS
HEAD_LOW = 1 << 31  # heads live in [HEAD_LOW, HEAD_LOW << WORD_BITS)
WORD_BITS = 32
WORD_MASK = (1 << WORD_BITS) - 1
HEAD_BITS = 64
# encoding s with frequency f first emits a word when the head is >= f << _EMIT_SHIFT, so that
# the encoded head stays below 2^63 (HEAD_LOW is a multiple of PRECISION: exact inverses)
_EMIT_SHIFT = 31 - PRECISION_BITS + WORD_BITS


def _check_base(base) -> torch.Tensor | int:
    if isinstance(base, torch.Tensor):
        if base.dtype != torch.int64:
            raise HyperdescentError(f"coder base must be an int64 tensor, got {base.dtype}")
        lo, hi = int(base.min()), int(base.max())
    else:
        lo = hi = int(base)
    if lo < 1 or hi > PRECISION:
        raise HyperdescentError(f"coder base must be in [1, 2^{PRECISION_BITS}], got "
                                f"[{lo}, {hi}]")
    return base


def _raw_bits(base) -> int | None:
    """log2(base) for a power-of-two int base (coded as raw bits, exactly uniform), else None."""
    if isinstance(base, int) and base & (base - 1) == 0:
        return base.bit_length() - 1
    return None


class RansBuffer:
    """`lanes` rANS coders with int64 heads and one shared int32 word tape (Duda 2013)."""

    def __init__(self, lanes: int, device=None, capacity_words: int = 1024):
        self.head = torch.full((int(lanes),), HEAD_LOW, dtype=torch.int64, device=device)
        self.tape = torch.empty(max(1, int(capacity_words)), dtype=torch.int32, device=device)
        self.top = 0  # words on the tape
        self.peak_words = 0
        # (starts, frequencies) of every digit, for int bases
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _interval(self, sym: torch.Tensor, base) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(start, frequency) of digit `sym` under the 2^24-quantised uniform law on [0, base):
        start = floor(sym·2^24 / base); a table lookup for an int base, since int64 division
        is the coder's slowest operation."""
        if isinstance(base, int):
            tables = self._tables.get(base)
            if tables is None:
                edges = torch.div(torch.arange(base + 1, dtype=torch.int64,
                                               device=self.head.device) * PRECISION, base,
                                  rounding_mode="floor")
                tables = self._tables[base] = (edges[:-1], edges[1:] - edges[:-1])
            return tables[0].index_select(0, sym), tables[1].index_select(0, sym)
        start = torch.div(sym * PRECISION, base, rounding_mode="floor")
        return start, torch.div((sym + 1) * PRECISION, base, rounding_mode="floor") - start

    @property
    def lanes(self) -> int:
        """The number of coder lanes (one per parameter element)."""
        return self.head.numel()

    def bits(self) -> int:
        """Every bit the buffer holds now: the heads plus the words on the tape."""
        return HEAD_BITS * self.lanes + WORD_BITS * self.top

    def nbytes(self) -> int:
        """Bytes the buffer's tensors occupy (the tape's spare capacity included)."""
        return self.head.numel() * 8 + self.tape.numel() * 4

    def _message(self) -> torch.Tensor:
        words = self.tape[:self.top]
        nonzero = torch.nonzero(words).flatten()
        return words[int(nonzero[0]):].clone() if nonzero.numel() else words[:0].clone()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(heads, tape without its bottom zero words): equal snapshots are equal messages."""
        return self.head.clone(), self._message()

    def matches(self, snap: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether the buffer holds exactly the message of `snap` (bit for bit)."""
        head, words = snap
        return torch.equal(self.head, head) and torch.equal(self._message(), words)

    # -- the tape ----------------------------------------------------------------------------
    def _put(self, words: torch.Tensor) -> None:
        k = words.numel()
        if self.top + k > self.tape.numel():
            grown = torch.empty(max(2 * self.tape.numel(), self.top + k), dtype=torch.int32,
                                device=self.tape.device)
            grown[:self.top] = self.tape[:self.top]
            self.tape = grown
        # int64 words below 2^32 wrap into int32 two's complement; `_take` masks them back
        self.tape[self.top:self.top + k] = words.to(torch.int32)
        self.top += k
        self.peak_words = max(self.peak_words, self.top)

    def _take(self, k: int) -> torch.Tensor:
        if k > self.top:
            # zero words borrowed from below the bottom, under what the tape holds
            zeros = torch.zeros(k - self.top, dtype=torch.int32, device=self.tape.device)
            words = torch.cat([zeros, self.tape[:self.top]])
            self.top = 0
        else:
            words = self.tape[self.top - k:self.top]
            self.top -= k
        return words.to(torch.int64) & WORD_MASK

    # -- coding --------------------------------------------------------------------------------
    def push(self, sym: torch.Tensor, base, check: bool = True) -> None:
        """Encode one digit per lane, 0 <= sym < base (base: int or int64 tensor per lane)."""
        if check:
            base = _check_base(base)
            if sym.shape != self.head.shape or sym.dtype != torch.int64:
                raise HyperdescentError(f"push needs {self.lanes} int64 digits, got "
                                        f"{tuple(sym.shape)} {sym.dtype}")
            if bool((sym < 0).any()) or bool((sym >= base).any()):
                raise HyperdescentError("push: every digit must satisfy 0 <= digit < base")
        if isinstance(base, torch.Tensor) and base.dim() == 0:
            base = int(base)
        x = self.head
        bits = _raw_bits(base)
        if bits == 0:
            return  # base 1: nothing to code
        if bits is not None:  # a power of two: the digit's bits go below the head's
            emit = torch.nonzero(x >= 1 << (63 - bits)).squeeze(1)
            # (the emitting lanes' values wrap here and are overwritten below)
            head = torch.add(sym, x, alpha=1 << bits)
            if emit.numel():
                words = x.index_select(0, emit)
                self._put(words & WORD_MASK)
                head.index_copy_(0, emit, torch.add(sym.index_select(0, emit),
                                                    words >> WORD_BITS, alpha=1 << bits))
            self.head = head
            return
        start, freq = self._interval(sym, base)
        # x >= freq·2^39, without overflowing at freq = 2^24
        emit = torch.nonzero((x >> _EMIT_SHIFT) >= freq).squeeze(1)
        if emit.numel():
            words = x.index_select(0, emit)
            self._put(words & WORD_MASK)
            x = x.index_copy(0, emit, words >> WORD_BITS)
        q = torch.div(x, freq, rounding_mode="floor")
        # q·2^24 + (x mod freq) + start
        self.head = torch.addcmul(x + start, q, PRECISION - freq)

    def pop(self, base, check: bool = True) -> torch.Tensor:
        """Decode one digit per lane in [0, base): the inverse of `push`."""
        if check:
            base = _check_base(base)
        if isinstance(base, torch.Tensor) and base.dim() == 0:
            base = int(base)
        x = self.head
        bits = _raw_bits(base)
        if bits is not None:
            sym = x & (base - 1)
            x = x >> bits
        else:
            slot = x & (PRECISION - 1)
            # the largest digit whose interval starts at or below the slot
            sym = (slot * base + (base - 1)) >> PRECISION_BITS
            start, freq = self._interval(sym, base)
            x = torch.addcmul(slot - start, freq, x >> PRECISION_BITS)
        need = torch.nonzero(x < HEAD_LOW).squeeze(1)
        if need.numel():  # x is a fresh tensor: refill its low heads in place
            words = self._take(need.numel())
            x.index_copy_(0, need, (x.index_select(0, need) << WORD_BITS) | words)
        self.head = x
        return sym
