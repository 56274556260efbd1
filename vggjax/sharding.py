"""Data parallelism on a 1-D device mesh: batches split over its `data` axis, state replicated.

Training, evaluation, features and localisation all place their arrays with these, so XLA
inserts the all-reduce itself (the current JAX way, not `jax.pmap`).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes). Auto axes, not
    `jax.make_mesh`'s default Explicit ones: Linen's dropout fails under those."""
    devices = devices or jax.devices()
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh`: parameters and optimizer state."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The leading (batch) axis split over the devices of `mesh`."""
    return NamedSharding(mesh, P(DATA_AXIS))
