"""The VGG configurations of Table 1 as data, and one Flax module that builds them all.

Every net is five stages of convolutions, each followed by 2×2 max-pooling, then three
fully-connected layers (Sect. 2.1). The module has two forms over the same parameters:
the classic one for fixed-size crops (training, Sect. 3.1) and the dense one, where the
FC layers act as convolutions over a whole image of any size (testing, Sect. 3.2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vggjax import backend, convolution
from vggjax.errors import UserError, require
from vggjax.winograd import NHWC

# Table 1, one entry per column. Each stage is a list of layers: (kernel size, channels)
# for a conv layer, "LRN" for local response normalisation. Max-pooling ends every stage.
_S = {64: (3, 64), 128: (3, 128), 256: (3, 256), 512: (3, 512)}
TABLE_1: dict[str, tuple[tuple[Any, ...], ...]] = {
    "A": ((_S[64],), (_S[128],), (_S[256],) * 2, (_S[512],) * 2, (_S[512],) * 2),
    "A-LRN": ((_S[64], "LRN"), (_S[128],), (_S[256],) * 2, (_S[512],) * 2, (_S[512],) * 2),
    "B": ((_S[64],) * 2, (_S[128],) * 2, (_S[256],) * 2, (_S[512],) * 2, (_S[512],) * 2),
    "C": (
        (_S[64],) * 2,
        (_S[128],) * 2,
        (_S[256],) * 2 + ((1, 256),),
        (_S[512],) * 2 + ((1, 512),),
        (_S[512],) * 2 + ((1, 512),),
    ),
    "D": ((_S[64],) * 2, (_S[128],) * 2, (_S[256],) * 3, (_S[512],) * 3, (_S[512],) * 3),
    "E": ((_S[64],) * 2, (_S[128],) * 2, (_S[256],) * 4, (_S[512],) * 4, (_S[512],) * 4),
    # Sect. 4.1: B with each pair of 3×3 convs replaced by a single 5×5 conv.
    "B-shallow": (((5, 64),), ((5, 128),), ((5, 256),), ((5, 512),), ((5, 512),)),
}

# Names users know from torchvision, timm and Keras. "_bn" adds batch norm after each conv.
ALIASES = {
    "vgg11": "A",
    "vgg11_lrn": "A-LRN",
    "vgg13": "B",
    "vgg16_c": "C",
    "vgg16": "D",
    "vgg19": "E",
    "vgg13_shallow": "B-shallow",
    "shallow": "B-shallow",
}
BATCH_NORM_NETS = {"vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D", "vgg19_bn": "E"}

MODEL_NAMES = tuple(TABLE_1) + tuple(ALIASES) + tuple(BATCH_NORM_NETS)

# Krizhevsky et al. (2012), Sect. 3.3: b = a / (k + alpha * sum of a^2 over `size` channels)^beta.
LRN_PARAMS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
BN_EPSILON = 1e-5  # the "_bn" nets' batch norm, as torchvision's


def resolve_name(name: str) -> tuple[str, bool]:
    """Maps a model name or alias to (Table 1 configuration, batch_norm)."""
    if name in TABLE_1:
        return name, False
    if name.lower() in ALIASES:
        return ALIASES[name.lower()], False
    if name.lower() in BATCH_NORM_NETS:
        return BATCH_NORM_NETS[name.lower()], True
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


KERNEL_INITS: dict[str, Callable[..., Any]] = {
    # Sect. 3.1: "zero mean and 10^-2 variance"; the Caffe release used std 0.01, which we follow.
    "normal": nn.initializers.normal(stddev=1e-2),
    # Sect. 3.1: the later finding that Glorot & Bengio (2010) initialisation needs no pre-training.
    "glorot": nn.initializers.glorot_uniform(),
    "he": nn.initializers.he_normal(),
}


# fc8's width by objective, for a data set of this many classes: class scores, or Appendix A's
# one box (single-class regression) or box per class (per-class regression). What each learns,
# its loss and errors, is vggjax/objectives.py's.
FC8_OUTPUTS: dict[str, Callable[[int], int]] = {
    "classification": lambda classes: classes,
    "scr": lambda classes: 4,
    "pcr": lambda classes: 4 * classes,
}

DTYPES = ("float32", "bfloat16")


def _dtype_name(dtype: Any) -> str | None:
    """ "bfloat16" for "bfloat16" or jnp.bfloat16; None for what is not a dtype."""
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


def _positive(value: Any) -> bool:
    return (value or 0) > 0


def _hyper(
    default: Any,
    allowed: str | Collection[str] | None = None,
    ok: Callable[[Any], bool] | None = None,
    shapes: str = "",
) -> Any:
    """A ModelSpec field: its default, what it allows (`ok` tests a value, `allowed` says it in
    the error; a collection alone: one of its values) and the first layers whose shapes it fixes,
    "conv", "fc" (fc6, fc7) or "fc8": `vggjax.convert` reads it off them and writes it to
    config.json, and a net started from a checkpoint takes it from there (fc8's, unless
    fine-tuning for new classes). "": how the run trains and computes, its own choice."""
    if ok is None and allowed is not None:
        ok, allowed = allowed.__contains__, f"one of {tuple(allowed)}"
    return dataclasses.field(default=default, metadata=dict(allowed=allowed, ok=ok, shapes=shapes))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The net's hyper-parameters, each defined here once with its type, default, allowed values
    and meaning: what a `VGG` is built from. They are also the config fields and config.json keys
    of the same names: recipe.py's defaults are these, `check` is what create_model and
    options.validate run, and a checkpoint's config.json records those fixing its parameters'
    shapes (`fields_fixing`), which a net started from it takes (pretrained.with_net_of)."""

    # Which net: a Table 1 column ("D") or an alias ("vgg16"; "vgg16_bn" adds batch norm).
    # Its check is resolve_name's: the error lists every name.
    model: str = _hyper("D", shapes="conv")
    # The data set's classes; with `objective` they size fc8 (FC8_OUTPUTS).
    num_classes: int = _hyper(1000, "a positive integer", _positive, shapes="fc8")
    # What fc8 learns: class scores, or Appendix A's box ("scr") or box per class ("pcr").
    objective: str = _hyper("classification", FC8_OUTPUTS, shapes="fc8")
    # Scales every conv's channels: narrow nets of exactly the paper's shape (tests, the demo).
    width: float = _hyper(1.0, "a positive channel multiplier", _positive, shapes="conv")
    # fc6's and fc7's outputs.
    fc_width: int = _hyper(4096, "a positive integer", _positive, shapes="fc")
    # The training crop's side: fc6 sees its last pooled map, a (crop_size/32)² window.
    crop_size: int = _hyper(
        224,
        "a positive multiple of 32 (five 2×2 poolings)",
        lambda size: _positive(size) and size % 32 == 0,
        shapes="fc",
    )
    # Dropout after fc6 and fc7 in training (Sect. 3.1: 0.5).
    dropout_rate: float = _hyper(0.5, "in [0, 1)", lambda rate: 0 <= rate < 1)
    # The kernels' random start, biases at zero: "normal" is the paper's N(0, 1e-2), "glorot"
    # its later finding that deep nets need no pre-training.
    kernel_init: str = _hyper("normal", KERNEL_INITS)
    # The compute dtype ("bfloat16": mixed precision); parameters stay float32. Or a jnp dtype.
    dtype: str = _hyper("float32", f"one of {DTYPES}", lambda dtype: _dtype_name(dtype) in DTYPES)
    # How the CPU runs the 3×3 convs (vggjax/convolution.py): one of convolution.WINOGRAD, or
    # "auto", what vggjax.tune_cpu() picked for the process (the command lines call it; "off"
    # under VGGJAX_CPU_TUNING=0). A run's config.json records the one it used; load_pretrained
    # ignores that (how a run computed is not the net).
    winograd: str = _hyper("auto", ("auto", *convolution.WINOGRAD))

    def check(self, prefix: str = "") -> ModelSpec:
        """This spec, or a UserError naming the first field whose value is not allowed and what
        is (`prefix` says where it came from, e.g. "config.")."""
        resolve_name(self.model)
        for field in dataclasses.fields(self):
            ok, value = field.metadata["ok"], getattr(self, field.name)
            if ok is not None:
                require(ok(value), prefix + field.name, field.metadata["allowed"], value)
        return self


# The config fields (and config.json keys) that make the net.
MODEL_FIELDS = tuple(field.name for field in dataclasses.fields(ModelSpec))


def fields_fixing(*parts: str) -> tuple[str, ...]:
    """The ModelSpec fields fixing the shapes of `parts` of the net ("conv", "fc", "fc8")."""
    return tuple(f.name for f in dataclasses.fields(ModelSpec) if f.metadata["shapes"] in parts)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One row of the layer table: what the module builds and what the summary counts."""

    name: str  # Caffe's names (conv1_1 ... conv5_4, fc6, fc7, fc8), as in the released weights
    kind: str  # "conv", "lrn", "pool" or "fc"
    kernel: int = 0  # a conv's kernel side; an FC layer's window in the dense form
    features: int = 0


def layer_table(spec: ModelSpec) -> list[Layer]:
    """The layers of the net `spec` describes: a Table 1 configuration with channels scaled by
    `width`.

    fc6 sees the last pooled map of a crop, (crop_size/32)² positions: in the dense form it is
    a conv with that window (7×7 at 224); fc7 and fc8 are 1×1 convs.
    """
    layers = []
    for s, stage in enumerate(TABLE_1[resolve_name(spec.model)[0]], start=1):
        convs = 0
        for entry in stage:
            if entry == "LRN":
                layers.append(Layer(f"lrn{s}", "lrn"))
                continue
            convs += 1
            kernel, channels = entry
            layers.append(
                Layer(f"conv{s}_{convs}", "conv", kernel, max(1, round(channels * spec.width)))
            )
        layers.append(Layer(f"pool{s}", "pool", 2))
    layers += [
        Layer("fc6", "fc", spec.crop_size // 32, spec.fc_width),
        Layer("fc7", "fc", 1, spec.fc_width),
        Layer("fc8", "fc", 1, FC8_OUTPUTS[spec.objective](spec.num_classes)),
    ]
    return layers


FC_LAYERS = ("fc6", "fc7", "fc8")
# `output="conv3_3:pre"`: a conv layer's activation before its ReLU (after its batch norm).
PRE_RELU = ":pre"


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """Non-overlapping max-pooling (window == strides), floor: the same values as `nn.max_pool`.

    Computed as the maximum of the window's strided slices, one elementwise pass (a reduction over
    a reshape took 3× as long at 32 px), with the reduction's derivative (`_pool_jvp`): an
    elementwise equality mask, a tie sharing the gradient, where reduce_window's is an argmax
    scatter, which XLA's CPU backend runs slowly (BENCHMARKS.md, "VGG16 train step and
    inference"); the slices' own would split ties in halves through padded slices.
    """
    (wh, ww), (_, h, w, _) = window, x.shape
    assert tuple(strides) == tuple(window), "non-overlapping windows only"
    return _pool(x[:, : h // wh * wh, : w // ww * ww], wh, ww)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _pool(x: jax.Array, wh: int, ww: int) -> jax.Array:
    slices = [x[:, i::wh, j::ww] for i in range(wh) for j in range(ww)]
    return functools.reduce(jnp.maximum, slices)


@_pool.defjvp
def _pool_jvp(wh: int, ww: int, primals: tuple, tangents: tuple) -> tuple:
    """JAX's derivative of a max over the windows of a reshape, linear in the tangent."""
    (x,), (t,) = primals, tangents
    (n, h, w, c), y = x.shape, _pool(x, wh, ww)
    windows = lambda a: a.reshape(n, h // wh, wh, w // ww, ww, c)
    at_max = (windows(x) == y[:, :, None, :, None]).astype(t.dtype)
    return y, (windows(t) * at_max).sum((2, 4)) / at_max.sum((2, 4))


# VGG.pooling: the paper's max-pooling, or average pooling (Gatys et al.'s choice for style).
POOLINGS: dict[str, Callable[..., jax.Array]] = {"max": max_pool, "average": nn.avg_pool}


def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> jax.Array:
    """Cross-channel LRN of Krizhevsky et al. on NHWC input (used only by net A-LRN).

    Caffe and PyTorch divide alpha by `size`; Krizhevsky's formula, used here, does not.
    """
    half = size // 2
    sq = jnp.square(x.astype(jnp.float32))
    window_sum = jax.lax.reduce_window(
        sq,
        0.0,
        jax.lax.add,
        (1, 1, 1, size),
        (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)),
    )
    return (x / jnp.power(k + alpha * window_sum, beta)).astype(x.dtype)


def fc_as_conv(kernel: jax.Array, window: int) -> jax.Array:
    """An FC kernel (in, out) as the equivalent conv kernel (window, window, in/window², out).

    The classic form flattens the last feature map in NHWC order, so this reshape is exact:
    one set of parameters serves both the classic and the dense (Sect. 3.2) form.
    """
    fan_in, features = kernel.shape
    return kernel.reshape(window, window, fan_in // (window * window), features)


class FullyConnected(nn.Module):
    """An FC layer whose kernel can also be applied as a `window`×`window` VALID conv."""

    features: int
    window: int = 1
    kernel_init: Callable[..., Any] = KERNEL_INITS["normal"]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, dense: bool) -> jax.Array:
        fan_in = x.shape[-1] * (self.window**2 if dense else 1)
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if not dense:
            return x @ kernel + bias
        y = jax.lax.conv_general_dilated(
            x,
            fc_as_conv(kernel, self.window),
            (1, 1),
            "VALID",
            dimension_numbers=NHWC,
        )
        return y + bias


def valid_mask(sizes: jax.Array, height: int, width: int) -> jax.Array:
    """(N, height, width) booleans: True inside each image's top-left sizes[n] = (h, w) region."""
    rows = jnp.arange(height)[None, :] < sizes[:, :1]
    cols = jnp.arange(width)[None, :] < sizes[:, 1:]
    return rows[:, :, None] & cols[:, None, :]


def dense_map_sizes(sizes: jax.Array, crop_size: int) -> jax.Array:
    """The score-map size (h, w) of images of size `sizes` (N, 2) in the dense form."""
    return sizes // 32 - crop_size // 32 + 1


def _zero_outside(x: jax.Array, sizes: jax.Array | None) -> jax.Array:
    """`x` zeroed outside each image's valid region `sizes` (None: unchanged). Every conv's input
    is, and the region halves with floor at each pooling, so the padding acts exactly as the SAME
    padding of the image alone. (Zeroing the conv inputs, not only the ReLU outputs, matters: for
    an odd valid size a pooling window straddling the border carries an image value one row or
    column into the padding.)"""
    if sizes is None:
        return x
    return jnp.where(valid_mask(sizes, x.shape[1], x.shape[2])[..., None], x, 0)


def _channel_sums(weights: jax.Array, x: jax.Array) -> jax.Array:
    """Σ_n Σ_p weights[n, p] · x[n, p, c] for (N, P) `weights` and (N, P, C) `x`: a matrix
    product per image, then a sum over the images (a dot's sequential sum over all N·P rows
    rounded several times worse, and differently when the batch is split over devices)."""
    return jax.lax.dot_general(weights, x, (((1,), (1,)), ((0,), (0,)))).sum(0)


def _per_row(values: jax.Array, x: jax.Array) -> jax.Array:
    """(C,) `values` repeated on every row of (N, P, C) `x`, as a product with a column of ones
    per image: its transpose, which a gradient runs, is then `_channel_sums`' form, not a
    reduction."""
    n, p, c = x.shape
    ones = jnp.ones((n, p, 1), values.dtype)
    per_image = jnp.broadcast_to(values, (n, 1, c))
    return jax.lax.dot_general(ones, per_image, (((2,), (1,)), ((0,), (0,))))


class BatchNorm(nn.Module):
    """Batch norm over NHWC's N, H and W, as flax.linen.BatchNorm(momentum=0.9, epsilon=BN_EPSILON,
    use_fast_variance=False) with the same variables (params scale, bias; batch_stats mean, var),
    in float32, cast to `dtype` at the end.

    Why not Flax's: XLA's CPU backend splits each sum over N·H·W into a slow tree of partial
    sums; here every sum, the gradient's included, is a matrix product (`_channel_sums`,
    `_per_row`): at 32 px a sum over (131072, 16) took 0.46 ms against 3.8, the layer's forward
    and gradient 1.1-7.6× less (BENCHMARKS.md, "Small images on the CPU"). The variance
    is E[(x - mean)²], not E[x²] - mean²: that one cancels catastrophically when |mean| >> std,
    so the order of a reduction (one host or two) changed the update by 10% after 4 steps.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, counted: jax.Array | None = None, shift: jax.Array | None = None
    ) -> jax.Array:
        """Batch norm of `x` + `shift`.

        counted: (N, 1, 1, 1) booleans, the images the statistics are over (None: all).
        shift: (C,), a constant per channel added to `x` first (the conv layer's bias; None: 0).
          It only moves the mean: in training it cancels and enters the running mean alone, so
          `x` + `shift` is never computed (a pass over the layer's output, and one over its
          gradient for the shift's, which is zero).
        """
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        rows = x.reshape(x.shape[0], -1, c).astype(jnp.float32)
        shift = jnp.zeros((c,), jnp.float32) if shift is None else shift.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            centred = rows + _per_row(shift - mean, rows)
        else:
            weights = jnp.ones(rows.shape[:-1], jnp.float32)
            if counted is not None:
                weights = weights * counted.reshape(-1, 1).astype(jnp.float32)
            count = jnp.sum(weights)
            mean = _channel_sums(weights, rows) / count
            centred = rows + _per_row(-mean, rows)  # + (-mean): no gradient pass to negate
            var = _channel_sums(weights, centred * centred) / count
            if not self.is_initializing():
                moved = jax.lax.stop_gradient(mean + shift)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * moved
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        mul = jax.lax.rsqrt(var + BN_EPSILON) * scale
        y = centred * _per_row(mul, rows) + _per_row(bias, rows)
        return y.reshape(x.shape).astype(self.dtype)


class Conv(nn.Module):
    """A conv layer with flax.linen.Conv's parameters (HWIO kernel, bias) and SAME padding, by
    `vggjax.convolution`: the convolution and the bias apart, for a batch norm that folds the
    bias in (`BatchNorm`'s `shift`)."""

    features: int
    kernel_size: int
    kernel_init: Callable[..., Any]
    dtype: Any
    winograd: str

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)
        y = convolution.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=numbers, winograd=self.winograd
        )
        return y, bias


class VGG(nn.Module):
    """A VGG net: Table 1's column `spec.model`, in the classic form for crops and the dense
    form for whole images, over the same parameters.

    spec: its hyper-parameters (ModelSpec), which `model.width`, `model.crop_size` and the like
    read through; `config` and `batch_norm` are its name's, `num_classes` is fc8's width.
    """

    spec: ModelSpec = ModelSpec()
    # Batch norm in inference mode even when training: the conv layers are frozen (fine-tuning
    # the FC layers only), so their BN layers keep their statistics, as Keras does.
    batch_norm_frozen: bool = False
    # The five 2×2 pooling layers inside the net: a key of POOLINGS. Not Keras's `pooling`
    # (global pooling of the last map): this replaces max-pooling within the net.
    pool_layers: str = "max"

    def __getattr__(self, name: str) -> Any:
        """`model.width`, `model.crop_size`, …: the spec's fields, read through."""
        if name in MODEL_FIELDS:
            return getattr(self.spec, name)
        return super().__getattr__(name)

    @property
    def config(self) -> str:
        """The Table 1 column ("D" for "vgg16_bn")."""
        return resolve_name(self.spec.model)[0]

    @property
    def batch_norm(self) -> bool:
        """Whether a batch norm follows each conv (the "_bn" nets)."""
        return resolve_name(self.spec.model)[1]

    @property
    def num_classes(self) -> int:
        """fc8's outputs: spec.num_classes, or their boxes for a localisation objective."""
        return self.layers[-1].features

    @property
    def layers(self) -> list[Layer]:
        return layer_table(self.spec)

    def _upto(self, output: str | Sequence[str] | None) -> list[Layer]:
        """The layers to run to return the activations `output` names (None: all of them)."""
        layers = self.layers
        if output is None:
            return layers
        names = [layer.name for layer in layers]
        wanted = [output] if isinstance(output, str) else list(output)
        pre = [layer.name + PRE_RELU for layer in layers if layer.kind == "conv"]
        if not wanted or not set(wanted) <= set(names + pre):
            raise ValueError(
                f"output must name layers of the net ({', '.join(names)}; a conv's before its "
                f"ReLU: {pre[0]}), got {output!r}"
            )
        return layers[: max(names.index(n.removesuffix(PRE_RELU)) for n in wanted) + 1]

    def _check_input(self, shape: tuple[int, ...], dense: bool, sizes: Any, fc: bool) -> None:
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 (RGB) channels, got shape {shape}")
        (h, w), crop = shape[1:3], self.spec.crop_size
        least = crop if fc else 32
        if dense and (h < least or w < least):  # not min(): decidable for symbolic sides too
            raise ValueError(f"dense evaluation needs images at least {least}×{least}, got {h}×{w}")
        if not dense and (h, w) != (crop, crop):
            raise ValueError(
                f"the classic form takes {crop}×{crop} crops, got "
                f"{h}×{w}; use dense=True for whole images"
            )
        if sizes is not None and not dense:
            raise ValueError("per-image sizes apply to the dense form only (dense=True)")

    def _conv(self, layer: Layer, x: jax.Array, train: bool, counted: Any) -> jax.Array:
        """Conv layer `layer` (and its batch norm in the "_bn" nets), before the ReLU."""
        dtype = jnp.dtype(self.spec.dtype)
        y, bias = Conv(
            layer.features,
            layer.kernel,
            KERNEL_INITS[self.spec.kernel_init],
            dtype,
            self.spec.winograd,
            name=layer.name,
        )(x)
        if not self.batch_norm:
            return y + bias
        return BatchNorm(
            use_running_average=not train or self.batch_norm_frozen,
            dtype=dtype,
            name=layer.name + "_bn",
        )(y, counted, shift=bias)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        dense: bool = False,
        sizes: jax.Array | None = None,
        output: str | Sequence[str] | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array | dict[str, jax.Array]:
        """Runs the net on a batch.

        Args:
          x: NHWC RGB minus the training set's mean RGB (`load_pretrained`'s `preprocess`).
          train: dropout (`rngs={"dropout": key}`), BN on the batch (`mutable=["batch_stats"]`).
          dense: the FC layers as convolutions (Sect. 3.2), for any image ≥ crop_size².
          sizes: (dense form only) (N, 2) valid (height, width) of each image, placed top-left in
            a larger padded batch: the result is the image's alone (`_zero_outside`); map
            positions inside `dense_map_sizes(sizes)` are the image's, the rest to be ignored.
          output: a layer (`layers`: conv1_1 … pool5, fc6, fc7, fc8) whose activation to return,
            the net stopping there: a conv's after its ReLU (and BN), fc6's and fc7's after ReLU
            and dropout; `conv3_3:pre` (`PRE_RELU`) a conv's before its ReLU (perceptual losses).
            Up to pool5 any image ≥ 32² runs, without the FC layers (a `_notop` checkpoint). A
            sequence of names: a dict of their activations, from one pass.
          mask: (training, BN nets) (N,) 1 for the images that count, 0 for masked (undecodable)
            ones: batch norm's statistics, so its running averages, are over the counted ones.

        Returns:
          The logits, (N, classes); dense, a score map (N, h, w, classes) with h = H//32 −
          crop_size/32 + 1 (224: H//32 − 6); or `output`'s activation(s).

        Raises:
          ValueError: images of the wrong shape for the form, or an unknown layer name.
        """
        layers, found = self._upto(output), {}
        counted = None if mask is None else mask.reshape(-1, 1, 1, 1) > 0
        self._check_input(x.shape, dense, sizes, fc=layers[-1].kind == "fc")
        spec, dtype = self.spec, jnp.dtype(self.spec.dtype)
        init = KERNEL_INITS[spec.kernel_init]
        x = x.astype(dtype)
        for layer in layers:
            if layer.kind == "conv":
                x = self._conv(layer, _zero_outside(x, sizes), train, counted)
                found[layer.name + PRE_RELU] = x
                x = nn.relu(x)
            elif layer.kind == "lrn":
                x = local_response_norm(x, **LRN_PARAMS)
            elif layer.kind == "pool":
                x = POOLINGS[self.pool_layers](x, (2, 2), strides=(2, 2))
                sizes = None if sizes is None else sizes // 2
            else:
                if layer.name == "fc6" and not dense:
                    x = x.reshape(x.shape[0], -1)
                fc = FullyConnected(layer.features, layer.kernel, init, dtype, name=layer.name)
                x = fc(x, dense)
                if layer.name != "fc8":
                    x = nn.Dropout(spec.dropout_rate, deterministic=not train)(nn.relu(x))
            found[layer.name] = x
        if output is None:
            return x
        return found[output] if isinstance(output, str) else {n: found[n] for n in output}


def create_model(name: str, num_classes: int = 1000, **fields: Any) -> VGG:
    """The VGG net `name` (a Table 1 column such as "D", or an alias such as "vgg16_bn").

    Args:
      name: the net (ModelSpec.model).
      num_classes: the data set's classes (fc8's outputs for classification).
      **fields: any other field of ModelSpec by name, at its default if not given: `width`
        scales every conv's channels and `fc_width` sets the FC layers' size, so tests and the
        demo run narrow nets of exactly the paper's shape.

    Returns:
      The Flax module; `init_variables` draws its variables, `load_pretrained` reads them.

    Raises:
      UserError: naming the first field whose value is not allowed, and what is.
    """
    return VGG(ModelSpec(name, num_classes, **fields).check())


def spec_of(config: Mapping[str, Any]) -> ModelSpec:
    """The ModelSpec a config or a workdir's config.json describes; a field it lacks or leaves
    None takes its default (a converted checkpoint's config.json holds only some)."""
    return ModelSpec(**{k: config[k] for k in MODEL_FIELDS if config.get(k) is not None})


def model_from_config(config: Mapping[str, Any]) -> VGG:
    """The net a config (or a workdir's config.json) describes: the only place a config becomes
    a VGG. Its `objective` sizes fc8: class scores, or Appendix A's box (4) or box per class
    (4 × classes)."""
    return VGG(spec_of(config).check())


def random_variables(model: VGG, rng: jax.Array) -> dict[str, Any]:
    """Random variables for `model` (params, and batch_stats for the BN variants), traced: for use
    inside a jitted function. `init_variables` compiles it alone."""
    dummy = jnp.zeros((1, model.crop_size, model.crop_size, 3), jnp.float32)
    return dict(model.init(rng, dummy, train=False))


def init_variables(model: VGG, rng: jax.Array) -> dict[str, Any]:
    """`random_variables` as one compiled program (with backend.init_compiler_options)."""
    init = jax.jit(
        functools.partial(random_variables, model),
        compiler_options=backend.init_compiler_options(),
    )
    return init(rng)


def abstract_variables(model: VGG) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s variables without allocating them."""
    return jax.eval_shape(functools.partial(random_variables, model), jax.random.key(0))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
