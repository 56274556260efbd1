"""What a run prints, and a folder's classes read from the data (the command line, as a user runs it).

A training run's stderr holds vggjax's own lines only — no orbax, grain or jax narration, no
resource_tracker report of leaked shared memory at exit (grain workers on, so batches travel in
shared memory) — and --verbosity=1 brings the libraries' lines back. configs/demo.py says 10
classes; on a three-class folder the folder's count wins unless the command line gives one.
"""

import json
import logging
import os
import re
import shutil

import orbax.checkpoint as ocp
import pytest
from convert_files import CFG, NARROW, torchvision_state, write_torch
from helpers import run_main

import vggjax
from vggjax import checkpoints, convert

VGGJAX_DIR = os.path.dirname(os.path.abspath(vggjax.__file__))
# absl's line prefix: level, date, time, thread, file:line]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")


def test_a_run_prints_its_own_lines_and_reads_the_folders_classes(tmp_path, three_classes):
    result = _train(tmp_path, three_classes, "--config.num_train_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    files = [ABSL_LINE.match(line) for line in lines]
    assert all(files), [line for line, f in zip(lines, files) if not f]  # no stray warnings
    assert {f.group(1) for f in files} <= _module_files(), lines
    assert all(line.startswith("I") for line in lines), lines  # and nothing to warn about
    for expected in ("step 4/4 (100%)", "Saving the checkpoint of step 4", "val: top-1 err"):
        assert any(expected in line for line in lines), expected
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["num_classes"] == 3
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["val_images"] == 12

    # The libraries' lines are there for debugging; the run resumes and trains on.
    result = _train(tmp_path, three_classes, "--config.num_train_steps=6", "--verbosity=1")
    assert result.returncode == 0, result.stderr[-3000:]
    others = {m.group(1) for m in map(ABSL_LINE.match, result.stderr.splitlines()) if m}
    assert others - _module_files(), result.stderr[-3000:]
    assert "Resumed from the checkpoint at step 4" in result.stderr


def test_num_classes_given_on_the_command_line_is_checked(tmp_path, three_classes):
    result = _train(tmp_path, three_classes, "--config.num_classes=10")
    assert (result.returncode, result.stderr) == (
        2,
        "vggjax: error: config.num_classes is 10 but the folder training set has 3 classes\n",
    )


def test_restore_params_and_load_pretrained_say_nothing(tmp_path, caplog):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    convert.convert("torchvision", str(tmp_path / "w.pth"), "D", str(tmp_path / "ckpt"))
    with caplog.at_level(logging.INFO):
        checkpoints.restore_params(str(tmp_path / "ckpt"))
        vggjax.load_pretrained(str(tmp_path / "ckpt"))
    assert caplog.records == []
    with caplog.at_level(logging.INFO):  # what they keep quiet: orbax on a read-only manager
        ocp.CheckpointManager(
            str(tmp_path / "ckpt" / "checkpoints"),
            options=ocp.CheckpointManagerOptions(read_only=True),
        ).close()
    assert any("read_only=True" in r.getMessage() for r in caplog.records)


# Helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_classes(tiny_demo_dir, tmp_path_factory):
    """Three of the tiny demo set's classes as an image folder (12 training images each)."""
    root = tmp_path_factory.mktemp("three")
    for split in ("train", "val"):
        for name in sorted(os.listdir(os.path.join(tiny_demo_dir, split)))[:3]:
            shutil.copytree(os.path.join(tiny_demo_dir, split, name), root / split / name)
    return str(root)


def _train(workdir, data_dir, *extra: str):
    return run_main(
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.dataset=folder",
        f"--config.data_dir={data_dir}",
        "--config.width=0.0625",
        "--config.fc_width=32",
        "--config.batch_size=16",
        "--config.num_workers=2",
        "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=1000",
        *extra,
        timeout=600,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )


def _module_files() -> set[str]:
    return {f for _, _, files in os.walk(VGGJAX_DIR) for f in files if f.endswith(".py")}
