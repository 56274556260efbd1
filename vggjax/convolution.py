"""How each platform runs VGG's convolutions: the `conv_general_dilated` of every conv layer.

- CPU: Winograd's F(4×4, 3×3) (`vggjax.winograd`) where the net's Winograd setting picks it
  (`VGG.winograd`, `config.winograd`), XLA's convolution for the rest. The settings are named:
  "off" (XLA's alone), "small_pages" or "huge_pages" (the layers where it was faster, measured
  with malloc on 4 KB or on huge pages) and "all" (every float32 3×3 layer); "auto" is the
  process's: "off" unless `vggjax.tune_cpu()` picked one by this process's pages (vggjax's
  command lines call it). A training run records the one it used in its config.json. Of the
  layers Winograd's does not take, every setting but "off" runs those where XLA's convolution
  is slowest, on maps of side `PATCHES_SIDE` or less, as one matrix product
  (`small_map_conv`): a 3×3 layer on 2×2 maps of 128 channels, batch 128, took 15.7 ms against
  0.75 ms over the image's patches (BENCHMARKS.md, "Small images on the CPU"), less as one dense
  layer over the whole map (`map_conv`). Not conv1_1 by patches, though faster there
  too: its kernel gradient, one dot summing N·H·W rows in sequence, rounded differently on
  one device and on eight beyond tests/test_train.py's bound. conv1_1's forward, with its
  `RGB_CHANNELS` or fewer input channels, is `rgb_conv`'s 27 multiply-adds (XLA's derivatives).
- GPU: XLA's (cuDNN). With `RGB_PAD_ON_GPU`, conv1_1's three input channels and its kernel's
  are zero-padded to that many first, the same convolution in exact arithmetic: XLA pads
  float16 convolutions for the tensor cores itself (to 4 channels for 3 → 32 or 64, cuDNN's
  special case) but not bfloat16 or float32 ones. Issue 11's candidate, off (0) until measured:
  `benchmarks/train_step.py --rgb_pad=4`.
- TPU and anything else: XLA's.

Decided when tracing, by JAX's default backend (the one vggjax's meshes use) and the setting;
"auto" as the process's stood then: a function jitted earlier keeps what it was traced with.
Not by `lax.platform_dependent`: its autodiff carries the other branch's residuals as zeros,
which for conv2_2 at 112 px and batch 128 would be 1.8 GB of zeros per layer on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from vggjax import winograd as _winograd
from vggjax.errors import require

RGB_PAD_ON_GPU = 0  # 0: off; else the input channels conv1_1 is padded to on a GPU
WINOGRAD = ("off", *_winograd.RULES)  # the settings; "auto" is the process's (set_winograd)
_process_setting = "off"  # what "auto" means: vggjax.tune_cpu() picks one by the pages
PATCHES_SIDE = 2  # maps this small (either side): small_map_conv, under any setting but "off"
RGB_CHANNELS = 4  # inputs this narrow (conv1_1's): rgb_conv, under any setting but "off"


def set_winograd(setting: str) -> None:
    """Makes `setting` (one of WINOGRAD) what "auto" means for the nets traced from now on."""
    global _process_setting
    require(setting in WINOGRAD, "winograd", f"one of {', '.join(WINOGRAD)}", setting)
    _process_setting = setting


def in_effect(setting: str = "auto") -> str:
    """The Winograd setting a net of `setting` (one of WINOGRAD or "auto") computes with when
    traced now: "auto" resolved, and "off" on a GPU or TPU."""
    if jax.default_backend() != "cpu":
        return "off"
    return _process_setting if setting == "auto" else setting


def conv_general_dilated(
    lhs, rhs, window_strides, padding, *, winograd: str = "auto", **kw
) -> jax.Array:
    """`lax.conv_general_dilated` for `flax.linen.Conv(conv_general_dilated=...)`, as the
    platform's rule above and the Winograd setting `winograd` say for stride-1 SAME NHWC
    convolutions; XLA's for any other."""
    plain = (
        tuple(window_strides) == (1, 1)
        and padding in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)])
        and all(d in (None, (1, 1)) for d in (kw.get("lhs_dilation"), kw.get("rhs_dilation")))
        and kw.get("feature_group_count", 1) == 1
        and kw.get("dimension_numbers")
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _winograd.NHWC)
    )
    platform, rules = jax.default_backend(), in_effect(winograd)
    if plain and rules != "off":
        train, infer = (
            _winograd.worth_it(lhs.shape, rhs.shape, lhs.dtype, kind, rules)
            for kind in ("train", "infer")
        )
        if train or infer:
            return _winograd.conv(lhs, rhs, train, infer)
        if _patches_faster(lhs.shape, rhs.shape, padding):
            return small_map_conv(lhs, rhs)
        if _rgb(lhs, rhs):
            return rgb_conv(lhs, rhs)
    if plain and platform == "gpu" and lhs.shape[-1] == 3 < RGB_PAD_ON_GPU:
        lhs, rhs = pad_channels(lhs, rhs, RGB_PAD_ON_GPU)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)


def pad_channels(x: jax.Array, kernel: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
    """NHWC `x` and HWIO `kernel` with zero input channels appended up to `channels`: the same
    convolution, and the kernel's gradient is the padded one's first slice."""
    extra = ((0, channels - x.shape[-1]),)
    return jnp.pad(x, ((0, 0),) * 3 + extra), jnp.pad(kernel, ((0, 0),) * 2 + extra + ((0, 0),))


def _patches_faster(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], padding) -> bool:
    """Where `patches_conv` beat XLA's convolution on the CPU, for a SAME odd square kernel."""
    return (
        min(x_shape[1:3]) <= PATCHES_SIDE
        and _odd_square(kernel_shape)
        and (padding == "SAME" or kernel_shape[0] == 3)
    )


def _rgb(x: jax.Array, kernel: jax.Array) -> bool:
    """Where `rgb_conv` beat XLA's convolution on the CPU: few input channels, an odd square
    kernel, float32 (the products add in the operands' type; XLA's convolution in float32)."""
    return (
        x.shape[-1] <= RGB_CHANNELS
        and _odd_square(kernel.shape)
        and x.dtype == kernel.dtype == jnp.float32
    )


def _odd_square(kernel_shape: tuple[int, ...]) -> bool:
    """Whether an HWIO kernel is k×k with k odd: SAME padding centres it."""
    return kernel_shape[0] == kernel_shape[1] and kernel_shape[0] % 2 == 1


def small_map_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`map_conv` or `patches_conv`, whichever multiplies less: (h·w)² against h·w times the
    kernel's taps per channel pair, so `map_conv` on maps of up to 9 pixels under a 3×3 kernel."""
    (_, h, w, _), k = x.shape, kernel.shape[0]
    return map_conv(x, kernel) if h * w <= len(_taps(h, w, k)) else patches_conv(x, kernel)


def _taps(h: int, w: int, k: int) -> list[tuple[int, int]]:
    """The taps (row, column) of a k×k SAME kernel that see an image pixel from some output pixel
    of an h×w map: on maps smaller than the kernel, the outer ones see only padding."""
    half = k // 2
    return [(a, b) for a in range(k) for b in range(k) if abs(a - half) < h and abs(b - half) < w]


def _windows(x: jax.Array, k: int, taps: list[tuple[int, int]]) -> list[jax.Array]:
    """What each tap (a, b) of a k×k SAME kernel sees at every output pixel of NHWC `x`: the
    h×w window at (a, b) of `x` zero-padded by k // 2."""
    (_, h, w, _), half = x.shape, k // 2
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    return [padded[:, a : a + h, b : b + w] for a, b in taps]


def map_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stride-1 SAME convolution of NHWC `x` with an odd square HWIO `kernel` as one dense
    layer over the whole map: input pixel q reaches output pixel p through tap q - p (centred),
    zero beyond the kernel. On 2×2 maps of 128 channels, batch 128, it did 16 products per
    channel pair where `patches_conv` does 36 (BENCHMARKS.md, "Small images on the CPU"). Plain
    JAX operations, as `patches_conv`."""
    (n, h, w, _), k = x.shape, kernel.shape[0]
    half, zero = k // 2, jnp.zeros(kernel.shape[2:], kernel.dtype)
    pixels = [(i, j) for i in range(h) for j in range(w)]

    def tap(q: tuple[int, int], p: tuple[int, int]) -> jax.Array:
        a, b = q[0] - p[0] + half, q[1] - p[1] + half
        return kernel[a, b] if 0 <= a < k and 0 <= b < k else zero

    matrix = jnp.block([[tap(q, p) for p in pixels] for q in pixels])
    return (x.reshape(n, -1) @ matrix).reshape(n, h, w, -1)


def patches_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stride-1 SAME convolution of NHWC `x` with an odd square HWIO `kernel`, as one matrix
    product: each output pixel's window of inputs (im2col) times the kernel. Taps that see only
    padding on every pixel (on maps smaller than the kernel) are left out. Plain JAX operations,
    so every transformation differentiates it as it would anything else."""
    (n, h, w, _), k = x.shape, kernel.shape[0]
    taps = _taps(h, w, k)
    cols = jnp.concatenate(_windows(x, k, taps), axis=-1)
    weights = jnp.concatenate([kernel[a, b] for a, b in taps], axis=0)
    return (cols.reshape(n * h * w, -1) @ weights).reshape(n, h, w, -1)


@jax.custom_jvp
def rgb_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stride-1 SAME convolution of NHWC `x` with few channels (conv1_1's RGB) and an odd
    square HWIO `kernel` as k·k·C multiply-adds of shifted slices, XLA's convolution for its
    derivatives. XLA's convolution packs 3-channel windows slowly: at 32 px, batch 128, 16
    outputs, 1.06 against 3.56 ms; at 224 px, batch 8, 64 outputs, 11.6 against 16.5 ms
    (BENCHMARKS.md, "Small images on the CPU"). The products sit in a conditional's branch because
    XLA fuses an elementwise producer into each of its consumers: batch norm's three passes then
    each recomputed them, and the step went 58 → 70 ms. Its other branch, taken only for a
    non-finite kernel (whose output is NaN either way), is XLA's convolution."""
    return jax.lax.cond(jnp.isfinite(kernel[0, 0, 0, 0]), _products, _winograd.direct, x, kernel)


def _rgb_conv_jvp(primals: tuple, tangents: tuple) -> tuple:
    """The products' output; XLA's convolution of each non-zero tangent, so reverse mode runs
    XLA's kernel gradient (one sum per image, then over the images, however the batch is split)."""
    (x, kernel), (dx, dk) = primals, tangents
    y = rgb_conv(x, kernel)
    pairs = ((dx, kernel), (x, dk))
    given = [pair for pair, t in zip(pairs, tangents) if not isinstance(t, SymbolicZero)]
    parts = [_winograd.direct(*pair) for pair in given]
    return y, sum(parts[1:], parts[0]) if parts else jnp.zeros_like(y)


rgb_conv.defjvp(_rgb_conv_jvp, symbolic_zeros=True)


def _products(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Σ over taps (a, b) and input channels c of the shifted slice times kernel[a, b, c]."""
    (_, h, w, channels), k = x.shape, kernel.shape[0]
    taps = _taps(h, w, k)
    terms = [
        window[..., c : c + 1] * kernel[a, b, c]
        for (a, b), window in zip(taps, _windows(x, k, taps))
        for c in range(channels)
    ]
    return sum(terms[1:], terms[0])
