"""Results of several hosts in one place: process p holds stream elements p, p + P, …; every
process gets all of them, in the stream's order."""

from __future__ import annotations

import jax
import numpy as np


def gather(local: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
    """Each of `local`'s arrays (this process's rows) as the `total` rows of all processes."""
    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    rows = -(-total // count)
    padded = {
        k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in local.items()
    }
    gathered = multihost_utils.process_allgather(padded)  # (P, rows, ...)
    return {
        k: np.swapaxes(np.asarray(v), 0, 1).reshape(count * rows, *v.shape[2:])[:total]
        for k, v in gathered.items()
    }


def gather_ids(ids: list[str], total: int) -> np.ndarray:
    """`gather` for strings: as fixed-width UTF-8 bytes, the width agreed by all processes."""
    if jax.process_count() == 1:
        return np.asarray(ids, dtype=str)
    from jax.experimental import multihost_utils

    encoded = np.char.encode(np.asarray(ids, dtype=str), "utf-8")
    width = int(np.max(multihost_utils.process_allgather(np.int32(encoded.dtype.itemsize))))
    as_bytes = encoded.astype(f"S{width}").view(np.uint8).reshape(len(ids), width)
    gathered = gather({"ids": as_bytes}, total)["ids"]
    return np.char.decode(np.ascontiguousarray(gathered).view(f"S{width}")[:, 0], "utf-8")
