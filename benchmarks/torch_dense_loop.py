"""The baseline of eval_cold_start.py: a plain PyTorch eager loop over the same dense evaluation.

    pip install -e '.[bench]'       # PyTorch; not needed by vggjax
    python benchmarks/torch_dense_loop.py --model=A --width=0.25 --num_images=8 --scales=224,256

Each image, at each Q, at its own size (no padding, no buckets, nothing compiled): the image
and its mirror as one batch of 2 through the dense net (the FC layers as convolutions), the
score map averaged, softmax, averaged over the flips and the scales: the multi-scale dense
posteriors `eval_dense.py` computes, from the same weights (vggjax's, converted here) and the
same images. PyTorch's defaults: NCHW, cuDNN without benchmark-mode autotuning; bfloat16 through
autocast. Timed after one warm-up forward pass (CUDA context and library handles); the images
are in host memory beforehand, as in eval_dense.py. Takes eval_dense.py's flags; ends with one
JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # vggjax's weights only: the GPU is PyTorch's

import json
import time
from collections.abc import Callable
from typing import Any

import eval_dense  # benchmarks/eval_dense.py: its flags, config, images and weights
import numpy as np
from absl import app, flags

from vggjax import cli, models


def torch_dense_net(model: models.VGG, variables: Any, device: str) -> Callable:
    """vggjax's dense form in PyTorch (NCHW), with vggjax's weights: a function of a batch."""
    import torch
    import torch.nn.functional as F

    if model.batch_norm:
        raise ValueError("the PyTorch loop covers the nets without batch norm (A–E)")
    weights = {}
    for layer in model.layers:
        if layer.kind in ("conv", "fc"):
            kernel, bias = (
                np.asarray(variables["params"][layer.name][k]) for k in ("kernel", "bias")
            )
            if layer.kind == "fc":
                kernel = models.fc_as_conv(kernel, layer.kernel)
            weights[layer.name] = [
                torch.tensor(np.asarray(a, np.float32), device=device)
                for a in (kernel.transpose(3, 2, 0, 1), bias)  # HWIO → OIHW
            ]
    lrn = models.LRN_PARAMS

    def forward(x: Any) -> Any:
        for layer in model.layers:
            if layer.kind == "pool":
                x = F.max_pool2d(x, 2)
            elif layer.kind == "lrn":  # PyTorch divides alpha by the size; vggjax does not
                x = F.local_response_norm(
                    x, lrn["size"], lrn["alpha"] * lrn["size"], lrn["beta"], lrn["k"]
                )
            else:
                padding = layer.kernel // 2 if layer.kind == "conv" else 0  # FC: VALID
                x = F.conv2d(x, *weights[layer.name], padding=padding)
                x = x if layer.name == "fc8" else F.relu(x)
        return x

    return forward


def dense_loop(
    forward: Callable, images: list[list[np.ndarray]], mean_rgb: Any, flip: bool, device: str
) -> Any:
    """Multi-scale dense posteriors (N, classes), one image and scale at a time."""
    import torch

    mean = torch.tensor(mean_rgb, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
    out = []
    for scales in images:
        p = 0.0
        for image in scales:
            x = torch.tensor(image, device=device).permute(2, 0, 1)[None].float() - mean
            if flip:
                x = torch.cat([x, x.flip(3)])
            scores = forward(x).float().mean((2, 3))
            p = p + torch.softmax(scores, -1).mean(0)
        out.append(p / len(scales))
    return torch.stack(out).cpu().numpy()  # the only wait for the device


def main(argv: list[str]) -> None:
    del argv
    import torch

    c = eval_dense.config()
    model = models.model_from_config(c)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    forward = torch_dense_net(model, eval_dense.variables_of(model), device)
    images = eval_dense.make_images(flags.FLAGS.num_images, tuple(c.eval.scales))
    autocast = torch.autocast(device, torch.bfloat16, enabled=c.dtype == "bfloat16")
    with torch.inference_mode(), autocast:
        crop = torch.zeros(1, 3, c.crop_size, c.crop_size, device=device)
        forward(crop).cpu()  # warm-up: CUDA context and library handles
        start = time.perf_counter()
        posteriors = dense_loop(forward, images, c.mean_rgb, c.eval.flip, device)
        seconds = time.perf_counter() - start
    if flags.FLAGS.save_posteriors:
        np.save(flags.FLAGS.save_posteriors, posteriors)
    result = dict(
        model=c.model,
        width=c.width,
        dtype=c.dtype,
        scales=list(c.eval.scales),
        flip=c.eval.flip,
        num_images=len(images),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        seconds=round(seconds, 2),
        images_per_sec=round(len(images) / seconds, 2),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run("torch_dense_loop", app.run, main)  # as every vggjax command line runs: tune_cpu first
