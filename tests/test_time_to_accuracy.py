"""benchmarks/time_to_accuracy.py: the PyTorch peer reads vggjax's order of examples, refuses a
recipe it does not implement, and the benchmark's JSON line, on a tiny folder of 28-pixel images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import time_to_accuracy  # benchmarks/time_to_accuracy.py

from vggjax import recipe
from vggjax.data import pipeline, sources
from vggjax.errors import UserError

# A provisional small-image config: the benchmark reads the whole recipe from the config object.
_CONFIG = """
from vggjax import recipe


def get_config():
    c = recipe.paper_recipe("vgg11_bn", "32-36")
    c.dataset, c.num_classes, c.crop_size, c.eval_scale = "folder", 2, 32, 32
    c.width, c.fc_width, c.dropout_rate, c.kernel_init = 1 / 16, 32, 0.0, "he"
    c.batch_size, c.num_epochs, c.num_workers, c.mean_rgb = 8, 1, 0, (128.0, 128.0, 128.0)
    return c
"""


def _write_folder(root, train_per_class: int, val_per_class: int) -> None:
    """Two classes of constant grey 28-pixel PNGs, each image its own grey level."""
    level = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(2):
            os.makedirs(root / split / str(label))
            for i in range(count):
                level += 3
                pixels = np.full((28, 28), level, np.uint8)
                Image.fromarray(pixels).save(root / split / str(label) / f"{i:03d}.png")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_mnist")
    _write_folder(root, train_per_class=12, val_per_class=4)
    return root


@pytest.mark.parametrize("in_memory", [False, True])
def test_peer_order_is_vggjax_sampler_order(tiny_folder, tmp_path, in_memory):
    """The index order the peer trains in is the training pipeline's, batch for batch over
    three epochs (batches straddling them), read back from each image's own grey level."""
    c = recipe.paper_recipe("vgg11_bn", "32")
    if in_memory and "data_in_memory" not in c:
        pytest.skip("this vggjax has no config.data_in_memory")
    c.dataset, c.data_dir, c.crop_size, c.num_workers = "folder", str(tiny_folder), 32, 0
    c.batch_size, c.colour_shift_std, c.seed = 5, 0.0, 7
    if in_memory:
        c.data_in_memory, c.data_cache_dir = True, str(tmp_path)
    files = sources.make_source(c, "train")
    level = {3 * (i + 1): i for i in range(len(files))}  # _write_folder's grey levels, in order
    steps = 3 * len(files) // c.batch_size + 1
    batches = iter(pipeline.train_dataset(c))
    try:
        read = [[level[int(v)] for v in next(batches)["image"][:, 16, 16, 0]] for _ in range(steps)]
    finally:
        pipeline.close(batches)
    order = time_to_accuracy.stream_order(c.seed, len(files), steps, c.batch_size)
    np.testing.assert_array_equal(order, read)
    epochs = order.reshape(-1)[: 2 * len(files)].reshape(2, -1)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(files)))
    assert list(epochs[0]) != list(epochs[1])  # a fresh permutation each epoch


def test_peer_refuses_what_it_does_not_implement():
    c = recipe.paper_recipe("vgg11_bn", "32")
    time_to_accuracy.check_peer(c)
    c.trainable = "fc"
    with pytest.raises(UserError, match="config.trainable"):
        time_to_accuracy.check_peer(c)
    c.trainable, c.some_new_option = "all", 1
    with pytest.raises(UserError, match="does not implement config.some_new_option"):
        time_to_accuracy.check_peer(c)


def _benchmark(tmp_path, tiny_folder, *flags: str) -> subprocess.CompletedProcess:
    config = tmp_path / "config.py"
    config.write_text(_CONFIG)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "time_to_accuracy.py")]
        + [f"--config={config}", f"--data_dir={tiny_folder}", *flags],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_benchmark_json_line(tmp_path, tiny_folder):
    """One epoch of a narrow net, both frameworks: per-epoch seconds and accuracies, the seconds
    to the target, the ratio and the host."""
    done = _benchmark(tmp_path, tiny_folder, "--target=0", "--torch_compile=eager")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps_per_epoch"] == 3 and result["target"] == 0
    assert result["host"]["cpus"] == len(os.sched_getaffinity(0))
    for name in ("jax", "torch"):
        run = result[name]
        (epoch,) = run["epochs"]
        assert epoch["epoch"] == 1 and epoch["seconds"] > 0 and epoch["eval_seconds"] > 0
        assert epoch["accuracy"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
        assert run["final_accuracy"] == epoch["accuracy"]
        assert run["seconds_to_target"] == run["train_seconds"] == epoch["seconds"]
    assert result["torch"]["variant"] == "eager"
    ratio = result["jax"]["seconds_to_target"] / result["torch"]["seconds_to_target"]
    assert result["time_to_target_jax_over_torch"] == pytest.approx(ratio, abs=1e-3)


def test_benchmark_fails_in_one_line(tmp_path, tiny_folder):
    done = _benchmark(tmp_path, tiny_folder, "--target=0.9", "--epochs=0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("time_to_accuracy: error: ")
