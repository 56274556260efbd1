"""Eight fake CPU devices for the data-parallel tests; must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same tiny programs many times (and in subprocesses): compile each once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if os.environ["JAX_PLATFORMS"] != "cpu":
    # The tests hold float32 results to float32 references and tolerances. A GPU's default
    # float32 matmuls and convolutions round their inputs to TF32 (about 1e-3 relative; six
    # tests of test_models.py failed so on an H100): full float32 here and in subprocesses.
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import subprocess
import sys

import pytest
from helpers import ROOT, load_config

import vggjax

# The tests run as vggjax's programs do (XLA flags, Winograd, initialisation's options), less the
# restart with huge pages; subprocesses inherit the flags.
vggjax.tune_cpu()


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory):
    """A small copy of the generated demo set: 10 classes, 20 train and 4 val images each."""
    from vggjax.data import demo

    return demo.ensure_demo_dataset(
        str(tmp_path_factory.mktemp("cache") / "demo"), train_per_class=20, val_per_class=4
    )


def _tiny_config(data_dir):
    _, c = load_config("configs/demo.py")
    c.data_dir = data_dir
    c.width, c.fc_width, c.batch_size, c.num_workers = 1 / 16, 32, 16, 0
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 1000, 4
    return c


@pytest.fixture
def tiny_config(tiny_demo_dir):
    """configs/demo.py made smaller still: a few steps take seconds on a CPU."""
    return _tiny_config(tiny_demo_dir)


@pytest.fixture(scope="session")
def trained_demo_net(tmp_path_factory, tiny_demo_dir):
    """The tiny net trained 300 steps on the tiny demo set (about 40 s on 2 cores): a workdir
    whose features mean something (its own centre-crop top-1 error: 37.5% of 40 images).

    Trained by the command line in a process of its own with one device: 300 steps of 8-device
    all-reduces on 2 cores, after the other tests, once stalled XLA's CPU collectives past their
    40 s rendezvous limit (the process aborts). Data parallelism has its own tests."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    steps = 300
    args = [
        sys.executable,
        "-m",
        "vggjax.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.width=0.0625",
        "--config.fc_width=32",
        "--config.batch_size=32",
        "--config.num_workers=0",
        f"--config.num_train_steps={steps}",
        *(
            f"--config.{k}={steps}"
            for k in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps")
        ),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
