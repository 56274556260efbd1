"""VGG as a loss network: named activations of a pretrained net, content and Gram style losses,
LPIPS.

Perceptual, style and LPIPS losses (Gatys et al. 2016, Johnson et al. 2016, Zhang et al. 2018)
use a pretrained VGG's conv layers as a fixed feature extractor:

    net = perceptual.load("torchvision:vgg16")  # a published net by name, or any checkpoint
    maps = net.activations(rgb, ("conv2_2", "conv4_2:pre"))  # rgb: NHWC in [0, 1]
    loss = perceptual.content_loss(net, x, y) + 1e3 * perceptual.style_loss(net, x, style)
    distances = perceptual.lpips(net, x, y)  # (N,), with the official linear weights

Layers carry the Caffe release's names (`conv1_1` … `conv5_4`): a name is the activation after
the ReLU, `conv4_2:pre` before it; torchvision's `vgg16().features[:4]` is `conv1_2` and
`features[:3]` is `conv1_2:pre`. The input is RGB in [0, 1] whatever the weights' source: the
converter folds each source's convention (torchvision's normalisation, Keras's BGR) into conv1_1,
leaving only the mean RGB to subtract, which the checkpoint's config.json records.

A `LossNet` is a pytree whose leaves are the conv layers' variables (the FC layers are dropped):
pass it to a jitted function as an argument — closed over, the weights would be compiled in as
constants — and differentiate with respect to the images. `pool_layers="average"` replaces the
net's 2×2 max-pooling layers by average pooling, as Gatys et al. do for style transfer (not
Keras's `pooling="avg"`, a global pooling of the last map).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vggjax import models, pretrained
from vggjax.convert.torch import read_tensors
from vggjax.data import augment
from vggjax.errors import UserError, require

# Gatys et al.'s layers: content from conv4_2, style from the first conv of each stage.
CONTENT_LAYERS = ("conv4_2",)
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
# LPIPS's VGG16 layers (torchvision's features[:4], [:9], [:16], [:23], [:30]) and the file of the
# lpips package (v0.1, lpips 0.1.4's wheel) holding their linear layers, with its SHA-256.
LPIPS_LAYERS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
_LPIPS_FILE = ("weights", "v0.1", "vgg.pth")
_LPIPS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"


@flax.struct.dataclass
class LossNet:
    """A pretrained VGG's conv layers with the input convention they take."""

    variables: dict[str, Any]
    model: models.VGG = flax.struct.field(pytree_node=False)
    mean_rgb: tuple[float, float, float] = flax.struct.field(pytree_node=False)

    def activations(self, rgb: jax.Array, layers: Sequence[str]) -> dict[str, jax.Array]:
        """The named activations of images, from one pass that stops at the deepest one asked for.

        Args:
          rgb: NHWC RGB images in [0, 1], at least 32×32 (any size: the net runs densely).
          layers: names such as `conv2_2` (after its ReLU), `conv4_2:pre` (before it), `pool3`.

        Returns:
          {layer: its (N, h, w, C) activation}.
        """
        x = augment.subtract_mean(255.0 * rgb, self.mean_rgb)
        return self.model.apply(self.variables, x, dense=True, output=tuple(layers))


def load(path: str, pool_layers: str = "max") -> LossNet:
    """A pretrained net's conv layers as a loss network (its FC layers dropped).

    Args:
      path: what `vggjax.load_pretrained` takes: a converted checkpoint, a training workdir, or
        a published net's name (`torchvision:vgg16`, `keras:vgg19_notop`), converted on first use.
      pool_layers: the net's five 2×2 pooling layers: "max" as trained, or "average", which
        Gatys et al. prefer for style transfer (not a global pooling of the last map).

    Returns:
      A `LossNet`: pass it to jitted functions as an argument, not closed over, so its weights
      are not compiled in as constants.
    """
    allowed = f"one of {tuple(models.POOLINGS)}"
    require(pool_layers in models.POOLINGS, "pool_layers", allowed, pool_layers)
    path = pretrained.resolve(path)
    model, variables, _ = pretrained.load_pretrained(path)
    conv = {
        collection: {k: v for k, v in tree.items() if k not in models.FC_LAYERS}
        for collection, tree in variables.items()
    }
    mean = tuple(pretrained.read_config(path)["mean_rgb"])
    return LossNet(conv, model.clone(pool_layers=pool_layers), mean)


def gram(features: jax.Array) -> jax.Array:
    """(N, h, w, C) → (N, C, C) Gram matrices, divided by h·w·C (Johnson et al.), so layers of
    any size weigh alike."""
    n, h, w, c = features.shape
    f = features.reshape(n, h * w, c)
    return jnp.einsum("npc,npd->ncd", f, f) / (h * w * c)


def _weighted(terms: list[jax.Array], weights: Sequence[float] | None) -> jax.Array:
    weights = [1.0] * len(terms) if weights is None else list(weights)
    require(len(weights) == len(terms), "weights", f"{len(terms)} numbers, one a layer", weights)
    return sum(w * t for w, t in zip(weights, terms))


def content_loss(
    net: LossNet,
    images: jax.Array,
    targets: jax.Array,
    layers: Sequence[str] = CONTENT_LAYERS,
    weights: Sequence[float] | None = None,
) -> jax.Array:
    """Σ_l w_l · mean((φ_l(images) − φ_l(targets))²): Gatys et al.'s content term, Johnson et
    al.'s feature reconstruction loss (their VGG16 layer: conv2_2).

    Args:
      net: the loss network (`load`).
      images, targets: NHWC RGB in [0, 1], of the same shape.
      layers: the layers φ_l compared (default Gatys et al.'s conv4_2).
      weights: w_l, one per layer (default 1 each).

    Returns:
      The scalar loss, differentiable with respect to both image batches.
    """
    a, b = net.activations(images, layers), net.activations(targets, layers)
    return _weighted([jnp.mean(jnp.square(a[n] - b[n])) for n in layers], weights)


def style_loss(
    net: LossNet,
    images: jax.Array,
    styles: jax.Array,
    layers: Sequence[str] = STYLE_LAYERS,
    weights: Sequence[float] | None = None,
) -> jax.Array:
    """Σ_l w_l · mean((G_l(images) − G_l(styles))²) over Gram matrices (`gram`).

    Args:
      net: the loss network (`load`).
      images: NHWC RGB in [0, 1].
      styles: NHWC RGB in [0, 1], one image per image of `images` or a single one for the whole
        batch (its Gram matrices broadcast); their size may differ from the images': a Gram
        matrix is C × C whatever the map's size.
      layers: the layers compared (default the first conv of each stage, as Gatys et al.).
      weights: w_l, one per layer (default 1 each).

    Returns:
      The scalar loss.
    """
    a, b = net.activations(images, layers), net.activations(styles, layers)
    return _weighted([jnp.mean(jnp.square(gram(a[n]) - gram(b[n]))) for n in layers], weights)


# LPIPS (Zhang et al. 2018) -----------------------------------------------------------------------


def _lpips_file() -> str:
    """The installed lpips package's VGG weights, found without importing lpips (which imports
    torch and torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "LPIPS's linear weights come from the lpips package: pip install --no-deps "
            "lpips==0.1.4 (its weights file only: neither torch nor torchvision)"
        )
    return os.path.join(spec.submodule_search_locations[0], *_LPIPS_FILE)


@functools.cache
def lpips_weights() -> dict[str, np.ndarray]:
    """{layer of LPIPS_LAYERS: its (C,) non-negative linear weights}: lpips's official VGG weights
    (v0.1), read without torch from the installed lpips package and checked by their SHA-256."""
    path = _lpips_file()
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise UserError(f"cannot read LPIPS's weights {path}: {e.strerror}") from None
    if digest != _LPIPS_SHA256:
        raise UserError(
            f"{path}: SHA-256 {digest}, not that of lpips 0.1's VGG weights ({_LPIPS_SHA256}); "
            f"reinstall lpips (pip install --force-reinstall --no-deps lpips==0.1.4)"
        )
    tensors = read_tensors(path, "torch legacy")
    return {n: tensors[f"lin{i}.model.1.weight"].reshape(-1) for i, n in enumerate(LPIPS_LAYERS)}


def _unit(features: jax.Array) -> jax.Array:
    """features / (‖features‖ + 1e-10) over channels, as lpips's normalize_tensor; at a zero
    vector (every channel's ReLU off) the norm's gradient is taken as 0, not NaN."""
    s = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    norm = jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), 0.0)
    return features / (norm + 1e-10)


def lpips(net: LossNet, images: jax.Array, targets: jax.Array, spatial: bool = False) -> jax.Array:
    """LPIPS (Zhang et al. 2018, lpips's `LPIPS(net="vgg")`, v0.1): Σ_l mean_hw(w_l · (φ̂_l(x) −
    φ̂_l(y))²), φ̂_l the features of LPIPS_LAYERS unit-normalised over channels, w_l lpips's
    official linear weights (`lpips_weights`).

    lpips's input scaling, (x − shift) / scale on [−1, 1], is torchvision's normalisation of
    [0, 1] RGB (shift = 1 − 2·mean, scale = 2·std), which the converter folds into conv1_1: a net
    loaded from `torchvision:vgg16`, given [0, 1] RGB, computes lpips's distance itself. Other
    VGG16 checkpoints give the same formula over their own features.

    Args:
      net: a VGG16 loss network (`load`), full width: the linear weights need its channels.
      images, targets: NHWC RGB in **[0, 1]** (lpips's `normalize=True`), of the same shape.
      spatial: give the map instead, each level's term upsampled bilinearly to the input size
        before the sum, as lpips's `spatial=True`.

    Returns:
      (N,) distances, or (N, H, W) maps with `spatial`; differentiable with respect to both.
    """
    require(
        images.shape == targets.shape, "targets' shape", f"images' {images.shape}", targets.shape
    )
    require(net.model.config == "D", "LPIPS's net", "a VGG16 (D)", net.model.spec.model)
    weights = lpips_weights()
    a, b = net.activations(images, LPIPS_LAYERS), net.activations(targets, LPIPS_LAYERS)
    total = 0.0
    for layer in LPIPS_LAYERS:
        channels = a[layer].shape[-1]
        require(channels == weights[layer].size, f"{layer}'s channels", "VGG16's", channels)
        term = jnp.square(_unit(a[layer]) - _unit(b[layer])) @ weights[layer]
        total = total + (
            jax.image.resize(term, images.shape[:3], "bilinear") if spatial else term.mean((1, 2))
        )
    return total
