"""Is the GPU fed? `python -m vggjax.main` training on JPEGs against the synthetic-data step rate.

    python benchmarks/train_e2e.py --model=D --dtype=bfloat16 --batch_size=128   # a GPU host
    python benchmarks/train_e2e.py --model=A --width=0.125 --fc_width=64 --image_size=64 \
        --batch_size=16 --train_steps=40 --log_every=10 --images=256 --num_workers=2  # CPU smoke

Writes --images ImageNet-like JPEGs (`jpegs.write_jpegs`) as a folder data set, then
runs, one after the other in their own processes (so each has the accelerator to itself):

- synthetic: `benchmarks/train_step.py`, the train step on one batch already on the device;
- real: `python -m vggjax.main` with `dataset=folder` on those JPEGs (decoding and augmenting
  in `--num_workers` grain workers, default one per core), the command a user runs. Its rate is
  the median of the progress lines' img/s after the first (which holds the compilation).

Ends with one JSON line: both rates, their ratio (`fed` ≥ 0.9 is issue 11's target), the worker
count and the host's core count.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

import jpegs  # benchmarks/jpegs.py
import train_step  # noqa: F401  (its flags, which this script forwards)
from absl import app, flags

from vggjax import cli

# The net and the step: train_step.py's flags (--model, --width, --fc_width, --batch_size,
# --image_size, --dtype; its --steps are the synthetic run's timed steps).
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 200, "Training steps of the real run.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 20, "Steps per progress line (one rate each).")
_IMAGES = flags.DEFINE_integer("images", 1024, "Training JPEGs to generate (read for many epochs).")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain workers (0: one per core).")
FLAGS = flags.FLAGS

_RATE = re.compile(r"\| (\d+) img/s \|")
_HERE = pathlib.Path(__file__).resolve().parent


_NET = ("model", "width", "fc_width", "batch_size", "image_size", "dtype")


def synthetic_rate() -> float:
    """images/s of train_step.py's step on a batch already on the device."""
    cmd = [sys.executable, str(_HERE / "train_step.py")]
    cmd += [f"--{name}={FLAGS[name].value}" for name in (*_NET, "steps")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def real_rates(data_dir: pathlib.Path, workdir: pathlib.Path, workers: int) -> list[float]:
    """The img/s of each progress line of `vggjax.main` training on the folder, in order."""
    net = {name: FLAGS[name].value for name in _NET}
    net["crop_size"] = net.pop("image_size")
    s = 256 if net["crop_size"] == 224 else net["crop_size"]  # the paper's S, or the crop itself
    overrides = dict(
        net,
        dataset="folder",
        data_dir=data_dir,
        num_classes=10,
        num_workers=workers,
        num_train_steps=_TRAIN_STEPS.value,
        log_every_steps=_LOG_EVERY.value,
        eval_every_steps=10**9,
        checkpoint_every_steps=10**9,
    )
    cmd = [sys.executable, "-m", "vggjax.main", "--config=configs/vgg16.py"]
    cmd += [f"--workdir={workdir}", f"--config.train_scale=({s},{s})"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    log = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=_HERE.parent).stderr
    return [float(r) for r in _RATE.findall(log)]


def main(argv: list[str]) -> None:
    del argv
    cores = len(os.sched_getaffinity(0))
    workers = _WORKERS.value or cores
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp, "data")
        jpegs.write_jpegs(data / "train", _IMAGES.value)
        jpegs.write_jpegs(data / "val", FLAGS.batch_size)  # for the final validation pass
        synthetic = synthetic_rate()
        rates = real_rates(data, pathlib.Path(tmp, "run"), workers)
    if len(rates) < 2:
        raise SystemExit(f"need at least 2 progress lines, got {rates}: raise --train_steps")
    real = statistics.median(rates[1:])
    result = dict(
        {name: FLAGS[name].value for name in _NET},
        cores=cores,
        num_workers=workers,
        synthetic_images_per_sec=synthetic,
        real_images_per_sec=real,
        real_rates=rates,
        fed=round(real / synthetic, 3),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run("train_e2e", app.run, main)  # as every vggjax command line runs: tune_cpu first
