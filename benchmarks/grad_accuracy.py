"""float32 gradients of vggjax's default computation against float64, layer by layer.

    python benchmarks/grad_accuracy.py --model=D --image_size=128 --batch_size=2 --torch  # 3 min

One loss (cross-entropy, no dropout) on random images (normal, std 50) through a glorot-initialised
net; for each layer the relative error ‖g32 − g64‖ / ‖g64‖ of its kernel gradient, twice:
`plain`, against the float64 gradient of the same net; `held`, against float64 held to
float32's ReLU and max-pooling decisions (the net is linear in between), so that only rounding
differs. Where float32 and float64 decide differently (a pooling window whose two largest
values agree to float32 rounding, a ReLU input within rounding of 0), the gradient of that
window goes to another pixel: the plain error of every layer below jumps to 1e-3 or more. That
is max-pooling's kink, which any float32 computation meets (`decisions_differing` counts them;
with --torch, PyTorch's float32 against its float64 shows it too). Ends with one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch_train_step  # the same net in torchvision's layout; train_step's flags
from absl import app, flags

from vggjax import cli, models

_TORCH = flags.DEFINE_bool("torch", False, "Also PyTorch's float32 against its float64.")


def decisions(model: models.VGG, params: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """float32's ReLU masks (conv and FC layers) and max-pooling choices in `model`'s forward
    pass of `images`: per window, the share of the gradient each value gets (1 for the largest;
    1/k each for k equal largest, as the gradient of vggjax's max-pooling shares them). The
    forward pass of a gradient (`jax.vjp`'s): where a layer computes differently when not
    differentiated (vggjax.winograd's picks), its decisions can differ too."""
    layers = model.layers
    names = [layer.name for layer in layers if layer.name != "fc8"]
    apply = lambda p, x: model.apply({"params": p}, x, output=names)
    forward = jax.jit(lambda p, x: jax.vjp(apply, p, x)[0])
    acts = jax.device_get(forward(params, images))
    masks = {}
    for before, layer in zip(layers, layers[1:]):
        if layer.kind == "pool":
            n, h, w, c = acts[before.name].shape
            windows = (
                acts[before.name].reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
            )
            flat = windows.reshape(n, h // 2, w // 2, c, 4)
            top = flat == flat.max(-1, keepdims=True)
            share = (top / top.sum(-1, keepdims=True)).astype(flat.dtype)
            share = share.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
            masks[layer.name] = share.reshape(n, h, w, c)
    for layer in layers:
        if layer.kind in ("conv", "fc") and layer.name != "fc8":
            masks[layer.name] = acts[layer.name] > 0
    return masks


def held_net(model: models.VGG, params: Any, x: jax.Array, masks: dict | None) -> jax.Array:
    """`model`'s logits, written out with XLA's direct convolutions; with `masks`, ReLU and
    max-pooling follow them (`decisions`) instead of deciding."""
    for layer in model.layers:
        p = params.get(layer.name)
        if layer.kind == "conv":
            x = jax.lax.conv_general_dilated(
                x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = x + p["bias"]
            x = jax.nn.relu(x) if masks is None else x * masks[layer.name]
        elif layer.kind == "pool":
            n, h, w, c = x.shape
            x = x if masks is None else x * masks[layer.name]
            x = x.reshape(n, h // 2, 2, w // 2, 2, c)
            x = x.max((2, 4)) if masks is None else x.sum((2, 4))
        else:
            x = x.reshape(x.shape[0], -1) if layer.name == "fc6" else x
            x = x @ p["kernel"] + p["bias"]
            if layer.name != "fc8":
                x = jax.nn.relu(x) if masks is None else x * masks[layer.name]
    return x


def relative(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def cross_entropy(logits: jax.Array, labels: np.ndarray) -> jax.Array:
    return -jnp.mean(jax.nn.log_softmax(logits)[np.arange(len(labels)), labels])


def float64_gradients(model: models.VGG, params: Any, images: np.ndarray, labels, masks) -> Any:
    """The float64 kernel gradients of the same loss; held to `masks` unless None."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        loss = lambda p, x, m: cross_entropy(held_net(model, p, x, m), labels)
        grads = jax.jit(jax.grad(loss))(p64, jnp.asarray(images, jnp.float64), masks)
        return jax.device_get(grads)


def main(argv: list[str]) -> None:
    del argv
    model = models.create_model(
        flags.FLAGS.model, crop_size=flags.FLAGS.image_size, kernel_init="glorot"
    )
    if model.batch_norm or any(layer.kind == "lrn" for layer in model.layers):
        print(
            f"grad_accuracy.py: --model={flags.FLAGS.model} has batch norm or LRN, which "
            "held_net does not write out; choose one of A, B, C, D, E",
            file=sys.stderr,
        )
        sys.exit(2)
    params = models.init_variables(model, jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    images = rng.normal(
        0, 50, (flags.FLAGS.batch_size, flags.FLAGS.image_size, flags.FLAGS.image_size, 3)
    ).astype(np.float32)
    labels = rng.integers(0, model.num_classes, flags.FLAGS.batch_size)
    loss = lambda p: cross_entropy(model.apply({"params": p}, images), labels)
    g32 = jax.device_get(jax.jit(jax.grad(loss))(params))
    masks = decisions(model, params, images)
    result = dict(
        model=model.config,
        image_size=flags.FLAGS.image_size,
        batch_size=flags.FLAGS.batch_size,
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    for name, held in (("plain", None), ("held", masks)):
        g64 = float64_gradients(model, params, images, labels, held)
        result[name] = {
            n: float(f"{relative(g32[n]['kernel'], g64[n]['kernel']):.2e}") for n in g32
        }
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        model64 = model.clone(spec=dataclasses.replace(model.spec, dtype=jnp.float64))
        masks64 = decisions(model64, p64, images.astype(np.float64))
    result["decisions_differing"] = {
        n: int(np.sum(masks[n] != masks64[n]) // (2 if "pool" in n else 1)) for n in masks
    }
    if _TORCH.value:
        result["torch_plain"] = torch_errors(model, params, images, labels)
    print(json.dumps(result))


def torch_errors(model: models.VGG, params: Any, images: np.ndarray, labels) -> dict[str, float]:
    """PyTorch's float32 kernel gradients against its float64 ones, same weights and images."""
    import torch

    def gradients(dtype):
        net = torch_train_step.torch_vgg(model)
        torch_train_step.load_vggjax(net, model, {"params": params})  # float32, exact in float64
        net = net.to(dtype)
        layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        names = [layer.name for layer in model.layers if layer.kind in ("conv", "fc")]
        net.eval()
        x = torch.tensor(images.transpose(0, 3, 1, 2), dtype=dtype)
        torch.nn.functional.cross_entropy(net(x), torch.tensor(labels)).backward()
        return {n: m.weight.grad.double().numpy() for n, m in zip(names, layers)}

    g32, g64 = gradients(torch.float32), gradients(torch.float64)
    return {n: float(f"{relative(g32[n], g64[n]):.2e}") for n in g64}


if __name__ == "__main__":
    cli.run("grad_accuracy", app.run, main)  # as every vggjax command line runs: tune_cpu first
