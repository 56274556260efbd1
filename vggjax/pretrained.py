"""A trained net ready to use: its module, its variables, the input convention it expects and
the names of its classes.

Every vggjax net takes NHWC RGB images on the 0–255 scale minus a mean RGB (Sect. 2.1). Which
mean, and which net, is written in the workdir's `config.json`: by training (the whole config)
and by `vggjax.convert` (the model fields, the mean it folded the source's convention into, and
where the weights came from). So converted published weights and the checkpoints of our own
runs load the same way.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vggjax import checkpoints, classes, convert, models, storage
from vggjax.checkpoints import CONFIG_FILE, read_config
from vggjax.data import augment
from vggjax.errors import UserError


def with_net_of(
    config: ml_collections.ConfigDict, path: str, keep_classes: bool = False
) -> ml_collections.ConfigDict:
    """A copy of `config` describing the checkpoint's net, as its config.json records it: the
    model fields fixing its parameters' shapes (`models.fields_fixing`; with `keep_classes`,
    not fc8's: fine-tuning for new classes) and its mean RGB."""
    net = read_config(path)
    c = ml_collections.ConfigDict(config.to_dict())
    parts = ("conv", "fc") if keep_classes else ("conv", "fc", "fc8")
    for field in models.fields_fixing(*parts):
        if field in net:
            c[field] = net[field]
    if not keep_classes and "objective" not in net:  # converted before it was recorded
        c.objective = models.ModelSpec().objective
    c.mean_rgb = tuple(net["mean_rgb"])
    return c


def inherit_net(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with `init_from` a path (a published net's name, `torchvision:vgg16`, becomes
    its converted workdir: `resolve`), and for `config.model == ""` (fine-tuning) the net of
    `init_from`."""
    if not config.init_from:
        return config
    path = resolve(config.init_from)
    if path != config.init_from:
        config = ml_collections.ConfigDict(config.to_dict())
        config.init_from = path
    return config if config.model else with_net_of(config, path, keep_classes=True)


def resolve(path: str) -> str:
    """`path`, or for a published net's name (`torchvision:vgg16`, `keras:vgg19_notop`,
    `timm:vgg16.tv_in1k`) its converted workdir: fetched, verified and converted on first use."""
    source, _, name = path.partition(":")
    if storage.is_gcs(path) or os.path.exists(path) or not name:
        return path
    return convert.converted(source, name) if source in {s for s, _ in convert.WEIGHTS} else path


def load_pretrained(
    path: str, sharding: jax.sharding.Sharding | None = None
) -> tuple[models.VGG, dict[str, Any], Callable[[jax.Array], jax.Array]]:
    """A trained net, ready to apply: `model.apply(variables, preprocess(rgb))` are its logits.

    Args:
      path: a workdir of `vggjax.convert` or of training (its latest checkpoint), one of its
        step folders, or a published net's name (`"torchvision:vgg16"`, `"keras:vgg19_notop"`,
        `"timm:vgg16.tv_in1k"`), fetched, verified and converted on first use (`resolve`).
      sharding: where the arrays land (default: the first local device); `Engine.replicated`
        or a mesh's replicated sharding to run them on several devices.

    Returns:
      `(model, variables, preprocess)`: the module its config.json describes, its `params`
      (and `batch_stats` for BN nets), and the function taking NHWC RGB on 0–255 to the input
      the net was trained on (minus its mean RGB; each source's own convention is already
      folded into conv1_1). A net converted without its top (Keras's `_notop`) holds the conv
      layers only: `conv_features` runs them, or put a head of your own on them. Which class
      each output is: `class_names(path)`.

    Raises:
      UserError: no config.json, or a layer the model needs is missing or of another shape
        (weights of another net than the one config.json names).
    """
    path = resolve(path)
    with checkpoints.quiet_reading():
        config = read_config(path)
    # How the run that made it computed (config.json's winograd) is not the net: this process's.
    model = models.model_from_config({**config, "winograd": "auto"})
    variables = checkpoints.restore_params(path, sharding)
    include_top = config.get("pretrained", {}).get("include_top", True)
    expected = models.abstract_variables(model)
    if not include_top:
        expected["params"] = {
            k: v for k, v in expected["params"].items() if k not in models.FC_LAYERS
        }
    for name, layer in expected["params"].items():
        if name not in variables["params"]:
            raise UserError(f"{path}: layer {name} is missing; the model in {CONFIG_FILE} has it")
        want, got = (jax.tree.map(jnp.shape, t) for t in (layer, variables["params"][name]))
        if want != got:
            raise UserError(
                f"{path}: layer {name} has shapes {got}, but the model in "
                f"{CONFIG_FILE} needs {want}"
            )
    return (
        model,
        variables,
        functools.partial(augment.subtract_mean, mean_rgb=tuple(config["mean_rgb"])),
    )


def check_classifier(config: Mapping[str, Any], path: str) -> None:
    """UserError unless the net at `path` (`config`: its config.json) gives class scores: one
    converted without its top holds the conv layers only, a localisation net gives boxes."""
    if not config.get("pretrained", {}).get("include_top", True):
        raise UserError(f"{path} holds the conv layers only (no top): it gives no class scores")
    objective = config.get("objective", "classification")
    if objective != "classification":
        raise UserError(f"{path} is a localisation net ({objective}): it gives boxes, not classes")


def class_names(path: str) -> tuple[classes.Class, ...]:
    """What each of `load_pretrained(path)`'s outputs is, in order: `Class(id, name)`s, as its
    config.json records them (`vggjax.classes`); `classes.top_k(logits, class_names(path))`
    names an image's top 5. A separate call, so that `load_pretrained`'s three values stay.

    Raises:
      UserError: no config.json.
    """
    with checkpoints.quiet_reading():
        return classes.of_config(read_config(resolve(path)))


def conv_features(model: models.VGG, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    """The last conv stage's pooled map (N, H//32, W//32, C) of preprocessed images (H, W ≥ 32):
    what a checkpoint without the top computes, and what Keras's `include_top=False` nets output."""
    return model.apply(variables, images, dense=True, output="pool5")
