"""Train-step throughput on synthetic data: images/s and model FLOP utilisation.

    python benchmarks/train_step.py --model=D --batch_size=8 --image_size=224
    python benchmarks/train_step.py --model=A --width=0.25 --batch_size=32 --image_size=64 --steps=20
    python benchmarks/train_step.py --model=vgg11_bn --width=0.25 --fc_width=256 --image_size=32 \
        --batch_size=128 --dropout_rate=0    # configs/small_images.py's net

Ends with one JSON line holding `images_per_sec`. Multiply-adds come from the layer table
(`vggjax.summary`); a training step costs three forward passes' worth (forward, and the two
halves of the backward pass), so FLOPs = 2 × 3 × multiply-adds per image.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from vggjax import backend, cli, convolution, recipe, sharding, summary, train

_MODEL = flags.DEFINE_string("model", "D", "Table 1 name or alias.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel multiplier.")
_FC_WIDTH = flags.DEFINE_integer("fc_width", 4096, "FC layer width.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Crop size (a multiple of 32).")
_DROPOUT = flags.DEFINE_float(
    "dropout_rate", None, "Dropout after fc6 and fc7 (default: the recipe's, 0.5)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for utilisation (0: skip).")
_RGB_PAD = flags.DEFINE_integer(
    "rgb_pad", 0, "On a GPU, conv1_1's input channels zero-padded to this many (convolution.py)."
)
_HLO = flags.DEFINE_string(
    "hlo_out", "", "Write the compiled train step's optimised HLO to this file and count its ops."
)


def config() -> ml_collections.ConfigDict:
    c = recipe.paper_recipe(_MODEL.value)
    c.width, c.fc_width, c.crop_size = _WIDTH.value, _FC_WIDTH.value, _IMAGE.value
    c.batch_size, c.dtype, c.num_classes = _BATCH.value, _DTYPE.value, 1000
    if _DROPOUT.value is not None:
        c.dropout_rate = _DROPOUT.value
    return c


Runners = dict[str, Callable[[int], None]]


def jax_runners(
    c: ml_collections.ConfigDict,
) -> tuple[train.Trainer, Runners, Callable[[], str]]:
    """vggjax's jitted train step and forward pass on one synthetic batch: `runners[kind](n)`
    runs n of them and waits for the result (the first call compiles); the last item gives the
    compiled train step's optimised HLO."""
    convolution.RGB_PAD_ON_GPU = _RGB_PAD.value
    trainer = train.Trainer(c, sharding.make_mesh())
    state = trainer.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = trainer.global_batch(
        dict(
            image=rng.normal(0, 50, (c.batch_size, c.crop_size, c.crop_size, 3)).astype(np.float32),
            label=rng.integers(0, 1000, c.batch_size).astype(np.int32),
            mask=np.ones(c.batch_size, np.float32),
        )
    )
    forward = jax.jit(
        lambda s, images: trainer.model.apply(
            {"params": s.params, "batch_stats": s.batch_stats}, images, train=False
        )
    )

    def train_steps(n: int) -> None:
        nonlocal state
        for _ in range(n):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))

    def forward_passes(n: int) -> None:
        for _ in range(n):
            logits = forward(state, batch["image"])
        jax.block_until_ready(logits)

    def step_hlo() -> str:
        return trainer.train_step.lower(state, batch).compile().as_text()

    return trainer, {"train": train_steps, "infer": forward_passes}, step_hlo


def hlo_census(text: str) -> dict[str, Any]:
    """What to look for in a compiled step first: layout changes (transposes, copies) and how the
    convolutions ran (XLA's own, or which library call: on a GPU, cuDNN's forward, backward and
    fused bias + activation forms)."""
    ops = collections.Counter(re.findall(r"\b(transpose|copy|convolution)\(", text))
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    return dict(ops, custom_calls=dict(sorted(calls.items())))


def seconds_per_call(run: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    run(n)
    return (time.perf_counter() - start) / n


def describe(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a run measured, the head of every train-step benchmark's JSON line."""
    return dict(
        model=c.model,
        width=c.width,
        batch_size=c.batch_size,
        image_size=c.crop_size,
        dtype=c.dtype,
        platform=jax.devices()[0].platform,
        xla_flags=os.environ.get("XLA_FLAGS", ""),  # with vggjax's CPU defaults (backend.tune_cpu)
        huge_pages=backend.huge_pages(),
        malloc=backend.malloc(),
        winograd=convolution.in_effect(),
        rgb_pad=convolution.RGB_PAD_ON_GPU,
    )


def main(argv: list[str]) -> None:
    del argv
    c = config()
    trainer, runners, step_hlo = jax_runners(c)
    runners["train"](2)  # compiles
    seconds = seconds_per_call(runners["train"], _STEPS.value)
    macs = sum(r.macs for r in summary.layer_rows(trainer.model))
    tflops = 6 * macs * c.batch_size / seconds / 1e12
    result = dict(
        describe(c),
        devices=jax.device_count(),
        step_ms=round(seconds * 1e3, 2),
        images_per_sec=round(c.batch_size / seconds, 1),
        model_tflops=round(tflops, 3),
    )
    if _PEAK.value:
        result["mfu"] = round(tflops / _PEAK.value, 3)
    if _HLO.value:
        text = step_hlo()
        pathlib.Path(_HLO.value).write_text(text)
        result["hlo"] = hlo_census(text)
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run("train_step", app.run, main)  # as every vggjax command line runs: tune_cpu first
