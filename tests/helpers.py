"""What several test files share: the repo root, the command line in a subprocess, narrow nets."""

import importlib.util
import os
import subprocess
import sys

import jax

from vggjax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m vggjax.main ARGS` from the repo root, environment variables `env` added."""
    return run_module("vggjax.main", *args, timeout=timeout, **env)


def run_module(
    module: str, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the repo root, environment variables `env` added."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_config(path: str, arg: str | None = None):
    """A config file's module and its get_config(arg), as `--config=path[:arg]` loads them."""
    spec = importlib.util.spec_from_file_location("config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, (module.get_config(arg) if arg else module.get_config())


def narrow(name: str, crop: int = 64, **kw) -> models.VGG:
    """Net `name` at 1/16 width, FC layers 32 wide, 10 classes: the paper's shape, small."""
    return models.create_model(
        name, 10, width=1 / 16, fc_width=32, crop_size=crop, kernel_init="he", **kw
    )


def init(model: models.VGG) -> dict:
    # rbg keys compile ~4× faster than threefry on CPU; the values do not matter here.
    return models.init_variables(model, jax.random.key(0, impl="rbg"))
