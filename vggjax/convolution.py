"""How each platform runs VGG's convolutions: the `conv_general_dilated` of every conv layer.

- CPU: Winograd's F(4×4, 3×3) (`vggjax.winograd`) where the Winograd setting picks it, XLA's
  convolution for the rest. The setting is named: "off" (XLA's alone, the library's default),
  "small_pages" or "huge_pages" (the layers where it was faster, measured with malloc on 4 KB or
  on huge pages; `vggjax.tune_cpu` picks by this process's pages) and "all" (every float32 3×3
  layer). Programs set it from `config.winograd` and record it in the run's config.json.
- GPU: XLA's (cuDNN). With `RGB_PAD_ON_GPU`, conv1_1's three input channels and its kernel's
  are zero-padded to that many first, the same convolution in exact arithmetic: XLA pads
  float16 convolutions for the tensor cores itself (to 4 channels for 3 → 32 or 64, cuDNN's
  special case) but not bfloat16 or float32 ones. Issue 11's candidate, off (0) until measured:
  `benchmarks/train_step.py --rgb_pad=4`.
- TPU and anything else: XLA's.

Decided when tracing, by JAX's default backend (the one vggjax's meshes use) and the setting in
effect then: a function jitted before the setting changes keeps the setting it was traced with.
Not by `lax.platform_dependent`: its autodiff carries the other branch's residuals as zeros,
which for conv2_2 at 112 px and batch 128 would be 1.8 GB of zeros per layer on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from vggjax import winograd
from vggjax.errors import require

RGB_PAD_ON_GPU = 0  # 0: off; else the input channels conv1_1 is padded to on a GPU
WINOGRAD = ("off", *winograd.RULES)  # the settings; config.winograd also takes "auto"
_winograd = "off"  # the process's setting: vggjax.tune_cpu() or set_winograd() change it


def set_winograd(setting: str) -> None:
    """Makes `setting` (one of WINOGRAD) the process's Winograd setting for what is traced next."""
    global _winograd
    require(setting in WINOGRAD, "winograd", f"one of {', '.join(WINOGRAD)}", setting)
    _winograd = setting


@contextlib.contextmanager
def winograd_setting(setting: str) -> Iterator[str]:
    """Runs the block with `setting` (one of WINOGRAD, or "auto": the process's), then restores
    the process's; yields the setting in effect, as `in_effect` names it."""
    before = _winograd
    if setting != "auto":
        set_winograd(setting)
    try:
        yield in_effect()
    finally:
        set_winograd(before)


def in_effect() -> str:
    """The Winograd setting a net traced now runs with: "off" on a GPU or TPU."""
    return _winograd if jax.default_backend() == "cpu" else "off"


def conv_general_dilated(lhs, rhs, window_strides, padding, **kw) -> jax.Array:
    """`lax.conv_general_dilated` for `flax.linen.Conv(conv_general_dilated=...)`, as the
    platform's rule above says for stride-1 SAME NHWC convolutions; XLA's for any other."""
    plain = (
        tuple(window_strides) == (1, 1)
        and padding in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)])
        and all(d in (None, (1, 1)) for d in (kw.get("lhs_dilation"), kw.get("rhs_dilation")))
        and kw.get("feature_group_count", 1) == 1
        and kw.get("dimension_numbers")
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, winograd.NHWC)
    )
    platform = jax.default_backend()
    if plain and platform == "cpu" and _winograd != "off":
        train, infer = (
            winograd.worth_it(lhs.shape, rhs.shape, lhs.dtype, kind, _winograd)
            for kind in ("train", "infer")
        )
        if train or infer:
            return winograd.conv(lhs, rhs, train, infer)
    if plain and platform == "gpu" and lhs.shape[-1] == 3 < RGB_PAD_ON_GPU:
        lhs, rhs = pad_channels(lhs, rhs, RGB_PAD_ON_GPU)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)


def pad_channels(x: jax.Array, kernel: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
    """NHWC `x` and HWIO `kernel` with zero input channels appended up to `channels`: the same
    convolution, and the kernel's gradient is the padded one's first slice."""
    extra = ((0, channels - x.shape[-1]),)
    return jnp.pad(x, ((0, 0),) * 3 + extra), jnp.pad(kernel, ((0, 0),) * 2 + extra + ((0, 0),))
