"""configs/small_images.py and what it needs: IDX files to a folder, the fixed-budget learning-rate
schedules, and a short run of the config on a tiny folder of 28-pixel images held in memory."""

import gzip
import json
import os
import struct

import numpy as np
import optax
import pytest
from helpers import load_config, run_module

from vggjax import metrics, options, train
from vggjax.data import idx
from vggjax.errors import UserError


def _write_idx(path: str, array: np.ndarray) -> None:
    """The IDX format as MNIST's files hold it: 0, 0, type 0x08 (uint8), ndim, sizes, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 'digits' of 3 classes: a bright bar whose place is the class, and noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        image[6 + 6 * label : 10 + 6 * label, 4:24] = 250
    return images, labels


def test_idx_files_become_a_folder(tmp_path):
    images, labels = _digits(12)
    _write_idx(str(tmp_path / "images-idx3-ubyte.gz"), images)
    _write_idx(str(tmp_path / "labels-idx1-ubyte"), labels)
    np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "images-idx3-ubyte.gz")), images)
    out = tmp_path / "data" / "train"
    result = run_module(
        "vggjax.data.idx",
        f"--images={tmp_path / 'images-idx3-ubyte.gz'}",
        f"--labels={tmp_path / 'labels-idx1-ubyte'}",
        f"--out={out}",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["0", "1", "2"]
    from PIL import Image

    image = Image.open(out / "2" / "05.png")
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), images[5])


def test_idx_rejects_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x89PNG....")
    with pytest.raises(UserError, match="not an IDX file"):
        idx.read_idx(str(tmp_path / "x"))


def test_fixed_budget_schedules_warm_up_then_decay_to_zero():
    _, c = load_config("configs/small_images.py", "/data")
    cosine = train.learning_rate(c, total_steps=1000, steps_per_epoch=100)
    rates = np.array([float(cosine(s)) for s in range(1001)])
    np.testing.assert_allclose(rates[[0, 50, 100, 550, 1000]], [0, 0.05, 0.1, 0.05, 0], atol=1e-6)
    assert (np.diff(rates[100:]) <= 1e-9).all()
    c.lr_schedule, c.warmup_epochs = "linear", 0.0
    linear = train.learning_rate(c, total_steps=1000, steps_per_epoch=100)
    np.testing.assert_allclose(
        [float(linear(s)) for s in (0, 250, 1000)], [0.1, 0.075, 0], atol=1e-6
    )
    c.lr_schedule = "plateau"  # the paper's: constant, cut by the plateau schedule
    assert train.learning_rate(c, 1000, 100) == 0.1
    c.lr_schedule = "step"
    with pytest.raises(UserError, match="lr_schedule"):
        options.validate(c)


def test_small_images_config_is_valid_and_takes_its_folder():
    _, c = load_config("configs/small_images.py", "/data/mnist")
    options.validate(c)
    assert (c.dataset, c.data_dir, c.data_in_memory) == ("folder", "/data/mnist", True)
    assert (c.crop_padding, c.random_flip, c.lr_schedule) == (4, False, "cosine")


def test_small_images_config_trains_from_memory(tmp_path, monkeypatch):
    """An epoch of the config as it ships (a narrower net) on 28-pixel images held in memory: the
    rate follows the schedule (here its warm-up), which validation passes do not cut (even with
    a plateau rule that would cut at the second), and the run reports its test error."""
    for split, n in (("train", 48), ("val", 12)):
        images, labels = _digits(n, seed=len(split))
        idx.write_folder(images, labels, str(tmp_path / "data" / split))
    _, c = load_config("configs/small_images.py", str(tmp_path / "data"))
    c.num_classes, c.width, c.fc_width, c.batch_size = 3, 1 / 16, 32, 8
    c.data_cache_dir = str(tmp_path / "cache")
    c.num_epochs, c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 1, 2, 6, 3
    always_cut = optax.contrib.reduce_on_plateau(factor=0.5, patience=0, atol=1e9)
    monkeypatch.setattr(train, "make_plateau", lambda config: always_cut)
    reported, report = {}, metrics.Reporter.train

    def recording(self, step, sums, learning_rate):
        reported[step] = learning_rate
        report(self, step, sums, learning_rate)

    monkeypatch.setattr(metrics.Reporter, "train", recording)
    results = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert results["step"] == 6 and results["val_images"] == 12
    assert json.loads((tmp_path / "run" / "results.json").read_text())["step"] == 6
    schedule = train.learning_rate(c, total_steps=6, steps_per_epoch=6)  # all warm-up
    np.testing.assert_allclose([reported[3], reported[6]], [schedule(2), schedule(5)], rtol=1e-6)
