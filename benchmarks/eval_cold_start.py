"""Dense multi-scale evaluation from an empty compilation cache, from a warm one, and PyTorch.

    python benchmarks/eval_cold_start.py --model=D --num_images=1024 --batch_size=32 \\
        --scales=256,384,512 --dtype=bfloat16

Three processes in turn, on the same images and weights, each timing its own evaluation end to
end (images already in host memory; posteriors back on the host):

1. `eval_dense.py` with a new, empty persistent compilation cache: every program compiled;
2. `torch_dense_loop.py`: a plain PyTorch eager loop, each image at its own size (batch 1 plus
   its mirror), nothing compiled;
3. `eval_dense.py` again with the cache the first run filled (a second run of the evaluation).

Takes eval_dense.py's flags (forwarded to both); ends with one JSON line: the three runs' lines,
PyTorch's seconds ÷ each vggjax run's, and the largest difference between vggjax's and
PyTorch's posteriors (float32 rounding apart, the same computation), next to the largest
posterior (so that a difference is not small only because every posterior is uniform).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import eval_dense  # noqa: F401  (its flags, which this script forwards)
import numpy as np
from absl import app, flags

from vggjax import cli

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script: str, *args: str) -> dict:
    """A benchmark script in a process of its own: its last line, as JSON."""
    command = [sys.executable, os.path.join(HERE, script), *args]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    forwarded = [a for a in sys.argv[1:] if not a.startswith(("--cache_dir", "--save_posteriors"))]
    with tempfile.TemporaryDirectory() as scratch:
        cache = flags.FLAGS.cache_dir or os.path.join(scratch, "cache")
        if os.path.isdir(cache) and os.listdir(cache):
            raise SystemExit(f"--cache_dir={cache} is not empty: the first run must compile")
        jax_args = [*forwarded, f"--cache_dir={cache}", "--nocompare_fixed"]
        saved = {name: os.path.join(scratch, f"{name}.npy") for name in ("jax", "torch")}
        cold = run("eval_dense.py", *jax_args, f"--save_posteriors={saved['jax']}")
        torch = run("torch_dense_loop.py", *forwarded, f"--save_posteriors={saved['torch']}")
        warm = run("eval_dense.py", *jax_args)
        posteriors = {name: np.load(path) for name, path in saved.items()}
    difference = np.abs(posteriors["jax"] - posteriors["torch"]).max()
    result = dict(
        cold=cold,
        torch=torch,
        warm=warm,
        cold_vs_torch=round(torch["seconds"] / cold["first_pass_seconds"], 3),
        warm_vs_torch=round(torch["seconds"] / warm["first_pass_seconds"], 3),
        max_posterior_difference=float(difference),
        largest_posterior=float(posteriors["jax"].max()),  # far above 1/classes: not uniform
    )
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run("eval_cold_start", app.run, main)  # as every vggjax command line runs: tune_cpu first
