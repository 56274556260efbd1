"""`--verify`: the source library's own net on the original file against the converted one.

The libraries (keras.applications; torch with torchvision or timm) are imported only here and only
when asked for, so converting needs none of them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from vggjax import checkpoints, models
from vggjax.convert.layout import TORCH_MEAN_RGB, TORCH_STD_RGB
from vggjax.convert.torch import file_format
from vggjax.data import augment
from vggjax.errors import UserError

MAX_RELATIVE_DIFFERENCE = 1e-4
# run(model, include_top, RGB images on 0–255) → the library's logits, or its last pooled map.
Runner = Callable[[models.VGG, bool, np.ndarray], np.ndarray]


def _library(name: str, source: str, install: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(
            f"--verify for {source} weights needs {name}, which is not installed ({install})"
        ) from None


def _keras_runner(path: str) -> Runner:
    """keras.applications' VGG16 or VGG19 with Keras's own loader and preprocess_input."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = _library("keras", "keras", "pip install keras")

    def run(model: models.VGG, include_top: bool, images: np.ndarray) -> np.ndarray:
        depth = {"D": 16, "E": 19}.get(model.config)
        if depth is None or model.batch_norm:
            raise UserError("--verify: keras.applications has VGG16 (D) and VGG19 (E) only")
        app = getattr(keras.applications, f"vgg{depth}")
        net = getattr(app, f"VGG{depth}")(
            weights=None,
            include_top=include_top,
            input_shape=images.shape[1:],
            classes=model.num_classes,
            classifier_activation=None,
        )
        net.load_weights(path)
        return np.asarray(net(app.preprocess_input(images.copy()), training=False))

    return run


def _torch_runner(source: str, path: str) -> Runner:
    """torchvision's or timm's VGG, reading the file with torch.load(weights_only) or safetensors."""
    torch = _library("torch", source, "pip install torch")
    library = _library(source, source, f"pip install {source}")
    load = (
        _library("safetensors.torch", source, "pip install safetensors").load_file
        if file_format(path) == "safetensors"
        else lambda p: torch.load(p, weights_only=True)
    )

    def run(model: models.VGG, include_top: bool, images: np.ndarray) -> np.ndarray:
        name = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}.get(model.config)
        if name is None:
            raise UserError(f"--verify: {source} has no VGG of configuration {model.config}")
        name += "_bn" * model.batch_norm
        net = (
            getattr(library.models, name)(num_classes=model.num_classes)
            if source == "torchvision"
            else library.create_model(name, pretrained=False, num_classes=model.num_classes)
        )
        net.load_state_dict(load(path))
        x = (images / 255.0 - np.float32(TORCH_MEAN_RGB)) / np.float32(TORCH_STD_RGB)
        with torch.no_grad():
            return net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()

    return run


def reference(source: str, path: str) -> Runner:
    """The source library's own outputs on `path`: run(model, include_top, RGB images on
    0–255) → logits, or the last pooled map without the top, of the library's net of `model`'s
    configuration. UserError at once if the library is missing, so nothing is converted for a
    check that cannot run."""
    if source == "caffe":
        raise UserError(
            "--verify has no reference for --from=caffe: it would need Caffe itself "
            "(the converted net can be checked against Keras's VGG16/VGG19 files, "
            "which were converted from the same release)"
        )
    if source == "onnx":
        raise UserError(
            "--verify has no reference for --from=onnx: run the graph in onnxruntime and compare "
            "(tests/test_onnx_import.py does)"
        )
    run = _keras_runner(path) if source == "keras" else _torch_runner(source, path)

    def checked(model: models.VGG, include_top: bool, images: np.ndarray) -> np.ndarray:
        """`run`, the library's own failure on the file told in one line (its message can be
        many lines: the file is named, to be loaded in the library by hand)."""
        try:
            return run(model, include_top, images)
        except UserError:
            raise
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            raise UserError(
                f"--verify: the reference could not run: {source} raised "
                f"{type(e).__name__} on {path} (load it with {source} itself to see why)"
            ) from e

    return checked


def verify(output: str, run: Runner, num_images: int = 2) -> tuple[float, str]:
    """max |vggjax − reference| / max |reference| of the converted net in `output` and the
    source library's, on the same random RGB images, and what was compared."""
    config = checkpoints.read_config(output)  # not load_pretrained: pretrained imports convert
    model, variables = models.model_from_config(config), checkpoints.restore_params(output)
    include_top = "fc8" in variables["params"]
    images = (
        np.random.default_rng(0)
        .uniform(0, 255, (num_images, model.crop_size, model.crop_size, 3))
        .astype(np.float32)
    )
    expected = run(model, include_top, images)
    x = augment.subtract_mean(images, tuple(config["mean_rgb"]))
    if include_top:
        got = np.asarray(model.apply(variables, x))
    else:  # the last pooled maps, as pretrained.conv_features gives them
        got = np.asarray(model.apply(variables, x, dense=True, output="pool5"))
    if got.shape != expected.shape:
        raise UserError(f"--verify: vggjax gives shape {got.shape}, the reference {expected.shape}")
    what = (
        f"{'logits' if include_top else 'last pooled maps'} of {num_images} random "
        f"{model.crop_size}×{model.crop_size} images"
    )
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected))), what
