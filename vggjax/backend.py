"""vggjax's XLA flags for JAX's CPU backend, set at `import vggjax`; the user's own win.

`--xla_cpu_experimental_ynn_fusion_type=individual_dot`: jax 0.10 hands convolutions,
reductions and matrix products to YNNPACK and fuses each product with what feeds it; in VGG's
forward pass that put the whole convolution stack inside the fusion of fc8's product, and in
the train step YNNPACK's kernel gradients ran 3× slower than XLA's own convolutions. With the
flag YNNPACK gets the matrix products alone and XLA's Eigen kernels the convolutions. On a 2-core
CPU (VGG16 at 224, batch 8, same run as PyTorch; BENCHMARKS.md, "VGG16 train step and inference"):
with JAX's defaults 0.63× PyTorch in training and 0.61× in inference; with the flag and
vggjax.winograd, 1.03–1.31× the stronger PyTorch in training, 0.81–1.10× in inference. The
gradients stay float32's (that section).

XLA reads XLA_FLAGS once, when JAX creates its first backend (the first computation or
`jax.devices()`), not at `import jax`: importing vggjax before that is what counts, and a
program that computed with JAX before importing vggjax keeps JAX's defaults. Flags under
`--xla_cpu_` change nothing on GPUs or TPUs. To override, set the flag in XLA_FLAGS yourself:
`--xla_cpu_experimental_ynn_fusion_type=+individual_dot` keeps JAX's own default list. Set only
with the jaxlib versions in JAXLIB_RANGE, which have the flag: XLA stops at one it does not know.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "individual_dot"}
JAXLIB_RANGE = ((0, 10), (0, 12))  # [first, past the last) (major, minor) known to have them


def with_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with each of CPU_FLAGS it does not set appended."""
    given = {token.split("=", 1)[0] for token in xla_flags.split()}
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def set_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds CPU_FLAGS to `environ`'s XLA_FLAGS, keeping every flag already there, if the
    installed jaxlib is in JAXLIB_RANGE."""
    if JAXLIB_RANGE[0] <= _jaxlib_version() < JAXLIB_RANGE[1]:
        environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()
