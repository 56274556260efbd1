"""3×3 convolutions by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, CVPR 2016).

Why: on XLA's CPU backend a direct 3×3 convolution runs in Eigen at close to the cores' peak,
so the only way to make VGG's convolutions faster there is to do fewer multiplications. F(4×4,
3×3) computes each 4×4 output tile from a 6×6 input tile with 36 products per channel pair
instead of 144: the convolution becomes 36 matrix products (one per tile position, over the
channels) between a transform of the input and one of the kernel, then a transform back. The
transforms are sums of strided slices; the products are one batched dot. The transforms are
memory-bound, so where it wins depends on how cheap fresh memory is (`RULES`). The gradients
have their own form (`_backward`, gathers): transposing the forward transforms made XLA scatter,
which was slower than the direct convolution.

Accuracy: exact in real arithmetic; in float32 the transforms (coefficients up to 8 and down to
1/24) add rounding: about 2e-6 of the largest output where the direct convolution has 1e-7.
BENCHMARKS.md measures what that does to VGG16's gradients, and what each layer gains.

On the CPU only: `vggjax.convolution` decides, per layer and platform, when this runs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

# F(4×4, 3×3) with interpolation points 0, ±1, ±2, ∞: input (B^T), kernel (G), output (A^T).
_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ]
)
_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ]
)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
# The kernel transform G k G^T as one (36, 9) matrix: rows (column b, row a) of the 6×6 tile,
# as the input transform orders them; columns (i, j) of the 3×3 kernel.
_GG = np.einsum("ai,bj->baij", _G, _G).reshape(36, 9)
NHWC = ("NHWC", "HWIO", "NHWC")
# Where F(4×4, 3×3) beat XLA's convolution, layer by layer (VGG16 at 224, batch 8, 2-core CPUs;
# BENCHMARKS.md, "CPU defaults"): (fewest input channels, smallest map, largest map) for the
# forward pass alone ("infer") and with both gradients ("train"), by whether malloc gets huge
# pages ("huge_pages": fresh temporaries cost a quarter as much, and the transforms are mostly
# that) or not ("small_pages"). "huge_pages" trains maps down to 4 px by it: on the 8- and 4-px
# layers of configs/small_images.py's net (64 and 128 channels, batch 128) forward and both
# gradients took 4.5, 2.1 and 3.2 ms against XLA's 5.3, 2.8 and 4.7 (2026-12-06; 3.5% of the
# step), its forward alone no less than XLA's. "all": every float32 3×3 layer, for tests.
RULES = {
    "huge_pages": {"train": (64, 4, None), "infer": (64, 14, 112)},
    "small_pages": {"train": (128, 28, None), "infer": (128, 28, None)},
    "all": {"train": (1, 1, None), "infer": (1, 1, None)},
}


def worth_it(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    dtype: Any,
    kind: str = "train",
    rules: str = "huge_pages",
) -> bool:
    """Whether RULES[rules] pick F(4×4, 3×3) for this 3×3 layer, for `kind` "train" (forward and
    gradients) or "infer" (forward alone). Float32 only: the transforms' rounding is float32's."""
    channels, smallest, largest = RULES[rules][kind]
    return (
        jnp.dtype(dtype) == jnp.float32
        and tuple(kernel_shape[:2]) == (3, 3)
        and x_shape[-1] >= channels
        and smallest <= min(x_shape[1:3]) <= (largest or min(x_shape[1:3]))
    )


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 3×3 stride-1 SAME convolution of NHWC `x` with HWIO `kernel`, by F(4×4, 3×3)."""
    return conv(x, kernel, True, True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, train: bool, infer: bool) -> jax.Array:
    """The convolution by F(4×4, 3×3) where `infer` (not differentiated) or `train`
    (differentiated) says so, else by XLA: JAX runs this body only when no derivative is taken.

    A custom JVP, not a custom VJP, so forward mode works too: the tangent, linear in (dx, dk),
    is the transpose of `_backward`, which JAX transposes back to `_backward` for reverse mode
    (`_conv_jvp`)."""
    return _forward(x, kernel)[0] if infer else direct(x, kernel)


def _conv_jvp(train: bool, infer: bool, primals: tuple, tangents: tuple) -> tuple:
    """XLA's JVP where `train` is off; else the forward transforms and, as the tangent, the
    transpose of `_backward` (linear in the cotangent), so that JAX's transpose of the tangent,
    the reverse mode a gradient runs, is `_backward` itself: gathers, where transposing the
    forward transforms made XLA scatter. Zero tangents (a constant input or kernel) are skipped."""
    given = [not isinstance(t, SymbolicZero) for t in tangents]
    if not train:
        tangents = [t.instantiate() if isinstance(t, SymbolicZero) else t for t in tangents]
        return jax.jvp(direct, primals, tuple(tangents))
    y, residuals = _forward(*primals)
    if not any(given):
        return y, jnp.zeros_like(y)
    picked = lambda dy: [g for g, keep in zip(_backward(residuals, dy), given) if keep]
    tangent = jax.linear_transpose(picked, y)
    return y, tangent([t for t, keep in zip(tangents, given) if keep])[0]


conv.defjvp(_conv_jvp, symbolic_zeros=True)


def direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's stride-1 SAME convolution of NHWC `x` with HWIO `kernel`."""
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dn)


def _mix(parts: list[jax.Array], matrix: np.ndarray) -> list[jax.Array]:
    """[Σ_j matrix[r, j] · parts[j] for each row r], skipping zeros and multiplying by ±1."""
    out = []
    for row in matrix:
        terms = [
            p if c == 1 else -p if c == -1 else p * p.dtype.type(c) for p, c in zip(parts, row) if c
        ]
        out.append(sum(terms[1:], terms[0]))
    return out


def _windows(x: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
    """The six strided views x[4t + j], t < tiles, along `axis`: row j of every 6-row tile."""
    return [jax.lax.slice_in_dim(x, j, j + 4 * tiles - 3, 4, axis) for j in range(6)]


def _overlap_add(parts: list[jax.Array], axis: int) -> jax.Array:
    """The transpose of `_windows`: out[4t + j] = Σ parts[j][t], of length 4 · tiles + 2."""

    def shift(p, before, after):
        pads = [(before, after, 0) if d == axis else (0, 0, 0) for d in range(p.ndim)]
        return jax.lax.pad(p, p.dtype.type(0), pads)

    rows = [
        shift(parts[0], 0, 1) + shift(parts[4], 1, 0),
        shift(parts[1], 0, 1) + shift(parts[5], 1, 0),
    ]
    y = jnp.stack(rows + [shift(parts[2], 0, 1), shift(parts[3], 0, 1)], axis + 1)
    shape = list(parts[0].shape)
    shape[axis] = 4 * (shape[axis] + 1)
    return jax.lax.slice_in_dim(y.reshape(shape), 0, shape[axis] - 2, axis=axis)


def _input_transform(x: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
    """B^T d B for every 6×6 tile d of the zero-padded NHWC `x`: (36, tiles, channels), and
    (n, h, w) for the way back."""
    n, h, w, _ = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    x = jnp.pad(x, ((0, 0), (1, 1 + 4 * th - h), (1, 1 + 4 * tw - w), (0, 0)))
    v = jnp.stack(_mix(_windows(x, 1, th), _BT))  # rows: (6, n, th, W, c)
    v = jnp.stack(_mix(_windows(v, 3, tw), _BT))  # columns: (6, 6, n, th, tw, c)
    return v.reshape(36, n * th * tw, -1), (n, h, w)


def _kernel_transform(kernel: jax.Array) -> jax.Array:
    """G k G^T of the HWIO `kernel`: (36, in, out)."""
    u = jnp.dot(_GG.astype(kernel.dtype), kernel.reshape(9, -1))
    return u.reshape(36, *kernel.shape[2:])


def _output_transform(m: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """A^T m A for every tile's 6×6 products `m` (36, tiles, out): the NHWC output."""
    n, h, w = shape
    th, tw = -(-h // 4), -(-w // 4)
    m = m.reshape(6, 6, n, th, tw, -1)
    y = _mix([m[b] for b in range(6)], _AT)  # columns: 4 × (6, n, th, tw, o)
    y = jnp.stack([jnp.stack(_mix([c[a] for a in range(6)], _AT)) for c in y])
    y = jnp.transpose(y, (2, 3, 1, 4, 0, 5)).reshape(n, 4 * th, 4 * tw, -1)
    return y[:, :h, :w]


def _forward(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple]:
    """The output, and what the tangent needs: both transforms and the shape."""
    v, shape = _input_transform(x)
    u = _kernel_transform(kernel)
    return _output_transform(jnp.einsum("epc,eco->epo", v, u), shape), (v, u, shape)


def _backward(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both gradients, as gathers: the transposed transforms, then the transposed products."""
    v, u, (n, h, w) = residuals
    th, tw = -(-h // 4), -(-w // 4)
    dy = jnp.pad(dy, ((0, 0), (0, 4 * th - h), (0, 4 * tw - w), (0, 0)))
    dy = dy.reshape(n, th, 4, tw, 4, -1)
    cols = _mix([dy[:, :, :, :, s] for s in range(4)], _AT.T)  # 6 × (n, th, 4, tw, o)
    dm = jnp.stack([jnp.stack(_mix([c[:, :, r] for r in range(4)], _AT.T)) for c in cols])
    dm = dm.reshape(36, n * th * tw, -1)
    dv = jnp.einsum("epo,eco->epc", dm, u).reshape(6, 6, n, th, tw, -1)
    du = jnp.einsum("epc,epo->eco", v, dm)
    rows = [_overlap_add(_mix([dv[b, a] for b in range(6)], _BT.T), 2) for a in range(6)]
    dx = _overlap_add(_mix(rows, _BT.T), 1)[:, 1 : h + 1, 1 : w + 1]
    dk = jnp.dot(_GG.T.astype(du.dtype), du.reshape(36, -1)).reshape(3, 3, *u.shape[1:])
    return dx, dk
