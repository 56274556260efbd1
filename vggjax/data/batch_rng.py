"""grain's per-element random generators, for a whole batch at once.

grain's `random_map` hands element i of a stream a numpy Generator on Philox4x64-10, keyed by
the map's seed, its counter reset to (0, 0, 0, i) (grain's `RngPool`). Making and resetting one
generator per element was most of the in-memory pipeline's CPU (2.7 of 4.3 ms a batch of 128,
BENCHMARKS.md). `BatchRng` computes the same Philox blocks for a batch of stream positions in
vectorised numpy and reads them as numpy's Generator does: `integers` by Lemire's bounded method
on 32-bit halves of the 64-bit words, `random` from a word's top 53 bits. So element i's draws
are the ones its own generator gives, to the bit (tests/test_batch_rng.py).
"""

from __future__ import annotations

import numpy as np

_M = (np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157))  # Philox4x64 multipliers
_W = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B))  # its key schedule
_ROUNDS = 10  # numpy's Philox
_LOW32, _32 = np.uint64(0xFFFFFFFF), np.uint64(32)


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The low and high 64 bits of the 128-bit products a * b, from 32-bit halves."""
    a0, a1, b0, b1 = a & _LOW32, a >> _32, b & _LOW32, b >> _32
    cross0, cross1 = a0 * b1, a1 * b0
    carry = ((a0 * b0) >> _32) + (cross0 & _LOW32) + (cross1 & _LOW32)
    return a * b, a1 * b1 + (cross0 >> _32) + (cross1 >> _32) + (carry >> _32)


def philox4x64(counter: list[np.ndarray], key: tuple[np.uint64, np.uint64]) -> list[np.ndarray]:
    """Random123's Philox4x64-10 of each counter (four uint64 arrays): four uint64 arrays."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    with np.errstate(over="ignore"):
        for round_ in range(_ROUNDS):
            if round_:
                k0, k1 = k0 + _W[0], k1 + _W[1]
            lo0, hi0 = _mulhilo(_M[0], c0)
            lo1, hi1 = _mulhilo(_M[1], c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


class BatchRng:
    """The generators grain's `random_map(seed=seed)` gives the stream positions `positions`,
    drawn from together: each call draws once from every one and returns an array of the draws.
    Only the draws numpy makes from whole words and their halves are here; for the others
    (`normal`), `generators` hands each stream on to numpy at its place."""

    def __init__(self, seed: int, positions: np.ndarray):
        key = np.random.Philox(seed).state["state"]["key"]
        self._key = (np.uint64(key[0]), np.uint64(key[1]))
        self._index = np.asarray(positions, np.uint64)
        self._words = np.empty((len(self._index), 0), np.uint64)  # each generator's output
        self._used = np.zeros(len(self._index), np.int64)  # words taken
        self._half = np.zeros(len(self._index), bool)  # a word's high half is waiting
        self._halves = np.zeros(len(self._index), np.uint64)

    def _next_words(self, take: np.ndarray) -> np.ndarray:
        """The next 64-bit word of each generator in `take`, as numpy's Philox gives it: block b
        is Philox of the counter (b, 0, 0, position), b = 1, 2, ..."""
        while self._used[take].max(initial=-1) >= self._words.shape[1]:
            block = np.uint64(self._words.shape[1] // 4 + 1)
            zeros = np.zeros_like(self._index)
            words = philox4x64([zeros + block, zeros, zeros, self._index], self._key)
            self._words = np.concatenate([self._words, np.stack(words, axis=1)], axis=1)
        rows = np.flatnonzero(take)
        words = np.zeros(len(self._index), np.uint64)
        words[rows] = self._words[rows, self._used[rows]]
        self._used[rows] += 1
        return words

    def _next_uint32(self, active: np.ndarray) -> np.ndarray:
        """numpy's `next_uint32`: a word's low half, its high half on the next call."""
        take = active & ~self._half
        words = self._next_words(take)
        out = np.where(self._half, self._halves, words & _LOW32)
        self._halves = np.where(take, words >> _32, self._halves)
        self._half = np.where(active, ~self._half, self._half)
        return out

    def integers(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """`Generator.integers(low, high)` (int64, high excluded) for each generator; where the
        range holds one value, no draw, as in numpy."""
        low, high = np.broadcast_arrays(np.asarray(low, np.int64), np.asarray(high, np.int64))
        span = (high - low).astype(np.uint64)  # numpy's rng + 1
        if span.min(initial=1) < 1 or span.max(initial=1) > 2**32:
            raise ValueError("BatchRng.integers takes ranges of 1 to 2**32 values")
        out = np.zeros(len(self._index), np.uint64)
        pending = span > 1
        threshold = (np.uint64(2**32) - span) % np.maximum(span, 1)
        while pending.any():  # Lemire: redraw where the product's low half is under threshold
            product = self._next_uint32(pending) * span
            out = np.where(pending, product >> _32, out)
            pending &= (product & _LOW32) < threshold
        return low + out.astype(np.int64)

    def random(self) -> np.ndarray:
        """`Generator.random()` for each generator: a whole word's top 53 bits in [0, 1)."""
        words = self._next_words(np.ones(len(self._index), bool))
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def generators(self) -> list[np.random.Generator]:
        """numpy Generators in the state these streams have reached: the next draw of each is
        the one its stream would give."""
        out = []
        for i, (used, half, halves) in enumerate(zip(self._used, self._half, self._halves)):
            block = (used + 3) // 4  # the block its last word came from (0: none yet)
            counter = np.array([block, 0, 0, self._index[i]], np.uint64)
            buffer = self._words[i, 4 * block - 4 : 4 * block] if block else np.zeros(4, np.uint64)
            bits = np.random.Philox(key=np.array(self._key, np.uint64))
            bits.state = {
                "bit_generator": "Philox",
                "state": {"counter": counter, "key": np.array(self._key, np.uint64)},
                "buffer": np.array(buffer, np.uint64),
                "buffer_pos": int(used - 4 * block + 4) if block else 4,
                "has_uint32": int(half),
                "uinteger": int(halves),
            }
            out.append(np.random.Generator(bits))
        return out
