"""A vectorised information buffer for bits-back momentum: one coder lane per element, LIFO.

Each lane is an asymmetric-numeral-system coder (Duda 2013, "Asymmetric numeral systems")
with uniform digits coded exactly (no frequency quantisation): an int64 head y kept in
[2^16, 2^47), whose overflow goes to one shared int32 tape in 31-bit words. The one operation
reversible learning needs, multiplying by a momentum n/d with d = 2^k (Maclaurin, Duvenaud &
Adams 2015, Sec. 2.3), is one fused `exchange`: push the remainder r < d of the division by
d (y·d + r), then pop a digit s below n (divmod by n), as bits-back coding does (Townsend,
Bird & Barber 2019, "Practical lossless compression with latent variables using bits back
coding"). Net, the head grows by log2(d/n) bits, so a lane writes a word once every
31/log2(d/n) steps instead of moving a word each push and each pop.

Why the interval is exact: a lane emits when y >= n·2^(47-k), so that y·d + r < 2^47·n
stays in int64 and y·d//n stays below 2^47; an emitted head y >> 31 >= n·2^(16-k) maps to at
least 2^16. `unexchange` is the exact inverse (refill when the head drops below 2^16), and
so is `exchange` of `unexchange`: any interleaving undone in reverse order restores the
message. Below the bottom of the tape lie zero words: a refill from an empty tape borrows
them, so two tapes that differ only in zero words at the bottom hold the same message.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import HyperdescentError

HEAD_LOW = 1 << 16  # heads live in [HEAD_LOW, HEAD_LOW << WORD_BITS)
WORD_BITS = 31
WORD_MASK = (1 << WORD_BITS) - 1
HEAD_BITS = 64
HEAD_TOP_BITS = 47
MAX_DIGIT_BITS = 16


NUMPY_CPU = True  # int64 work on CPU with a scalar base in numpy (tests switch it off)


def fast(x: torch.Tensor, n) -> bool:
    """Whether the numpy kernels take x (CPU int64 lanes) with the scalar base n: numpy's int64
    ops vectorise (torch's CPU int64 add multiplies by alpha, emulated on AVX2) and it divides
    by a scalar with a multiply and shifts (libdivide) instead of one hardware division a lane."""
    return NUMPY_CPU and isinstance(n, int) and x.device.type == "cpu"


def floordiv(x: torch.Tensor, n) -> torch.Tensor:
    """x // n, exactly, for an int64 tensor x and an int (or int64 tensor) n >= 1."""
    if fast(x, n):
        return torch.from_numpy(np.floor_divide(x.numpy(), n))
    return torch.div(x, n, rounding_mode="floor")


def _check(k: int, n, lanes: int) -> None:
    if not isinstance(k, int) or not 0 <= k <= MAX_DIGIT_BITS:
        raise HyperdescentError(f"coder digit bits k must be an int in [0, {MAX_DIGIT_BITS}], "
                                f"got {k!r}")
    if isinstance(n, torch.Tensor):
        if n.dtype != torch.int64 or n.shape not in ((), (lanes,)):
            raise HyperdescentError(f"coder base n must be an int64 tensor of shape ({lanes},), "
                                    f"got {n.dtype} {tuple(n.shape)}")
        lo, hi = int(n.min()), int(n.max())
    else:
        lo = hi = int(n)
    if lo < 1 or hi > 1 << k:
        raise HyperdescentError(f"coder base n must be in [1, 2^k = {1 << k}], got [{lo}, {hi}]")


def _check_digits(x: torch.Tensor, base, lanes: int, what: str) -> None:
    if x.shape != (lanes,) or x.dtype != torch.int64:
        raise HyperdescentError(f"{what} needs {lanes} int64 digits, got {tuple(x.shape)} "
                                f"{x.dtype}")
    if bool((x < 0).any()) or bool((x >= base).any()):
        raise HyperdescentError(f"{what}: every digit must satisfy 0 <= digit < base")


class RansBuffer:
    """`lanes` exact uniform ANS coders with int64 heads and one shared int32 word tape."""

    def __init__(self, lanes: int, device=None, capacity_words: int = 1024):
        self.head = torch.full((int(lanes),), HEAD_LOW, dtype=torch.int64, device=device)
        self.tape = torch.empty(max(1, int(capacity_words)), dtype=torch.int32, device=device)
        self.top = 0  # words on the tape
        self.peak_words = 0

    @property
    def lanes(self) -> int:
        """The number of coder lanes (one per parameter element)."""
        return self.head.numel()

    def bits(self) -> int:
        """Every bit the buffer holds now: the heads plus the words on the tape (stored as
        32-bit words)."""
        return HEAD_BITS * self.lanes + 32 * self.top

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
        self.tape[self.top:self.top + k] = words.to(torch.int32)  # 31-bit words: no wrap
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
        return words.to(torch.int64)

    # -- coding --------------------------------------------------------------------------------
    def exchange(self, r: torch.Tensor, k: int, n, check: bool = True) -> torch.Tensor:
        """Push one digit r < 2^k per lane, then pop and return one digit below n (an int or
        an int64 tensor per lane, 1 <= n <= 2^k)."""
        if check:
            _check(k, n, self.lanes)
            _check_digits(r, 1 << k, self.lanes, "exchange")
        if fast(self.head, n):
            return torch.from_numpy(self.exchange_numpy(r.numpy(), k, n))
        y = self.head
        emit = torch.nonzero(y >= n * (1 << (HEAD_TOP_BITS - k))).squeeze(1)
        if emit.numel():  # rare: a lane emits once every 31/log2(d/n) steps
            words = y.index_select(0, emit)
            self._put(words & WORD_MASK)
            y.index_copy_(0, emit, words >> WORD_BITS)  # the head is the buffer's own
        z = (y << k) | r
        y = torch.div(z, n, rounding_mode="floor")
        s = torch.sub(z, y, alpha=n) if isinstance(n, int) else z - y * n
        self.head = y
        return s

    def exchange_numpy(self, r: np.ndarray, k: int, n: int) -> np.ndarray:
        """`exchange` in numpy on CPU with an int base n (unchecked): the same arithmetic."""
        y = self.head.numpy()
        emit = np.flatnonzero(y >= n << (HEAD_TOP_BITS - k))
        if emit.size:
            words = y[emit]
            self._put(torch.from_numpy(words & WORD_MASK))
            y[emit] = words >> WORD_BITS  # the head is the buffer's own
        z = np.left_shift(y, k)
        z |= r
        y = np.floor_divide(z, n)
        z -= y * n
        self.head = torch.from_numpy(y)
        return z

    def unexchange(self, s: torch.Tensor, k: int, n, check: bool = True) -> torch.Tensor:
        """The exact inverse of `exchange`: push the digit s < n back, pop and return r < 2^k."""
        if check:
            _check(k, n, self.lanes)
            _check_digits(s, n, self.lanes, "unexchange")
        if fast(self.head, n):
            return torch.from_numpy(self.unexchange_numpy(s.numpy(), k, n))
        z = torch.add(s, self.head, alpha=n) if isinstance(n, int) else \
            torch.addcmul(s, self.head, n)
        r = z & ((1 << k) - 1)
        y = z >> k
        need = torch.nonzero(y < HEAD_LOW).squeeze(1)
        if need.numel():  # y is a fresh tensor: refill its low heads in place
            words = self._take(need.numel())
            y.index_copy_(0, need, (y.index_select(0, need) << WORD_BITS) | words)
        self.head = y
        return r

    def unexchange_numpy(self, s: np.ndarray, k: int, n: int) -> np.ndarray:
        """`unexchange` in numpy on CPU with an int base n (unchecked): the same arithmetic."""
        z = self.head.numpy() * n
        z += s
        y = z >> k
        z &= (1 << k) - 1
        need = np.flatnonzero(y < HEAD_LOW)
        if need.size:
            y[need] = (y[need] << WORD_BITS) | self._take(need.size).numpy()
        self.head = torch.from_numpy(y)
        return z
