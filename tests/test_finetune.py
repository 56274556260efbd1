"""Fine-tuning (issue 5): from a converted checkpoint, a new last layer, all or some layers trained."""

import json
import os

import jax
import numpy as np
import pytest
from convert_files import CFG, NARROW, torchvision_state, write_torch
from helpers import run_main

from vggjax import checkpoints, convert, models, options, pretrained, train


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Narrow torchvision-layout VGG16 weights with 7 classes, converted to a vggjax checkpoint."""
    root = tmp_path_factory.mktemp("converted")
    state = torchvision_state(CFG["D"], **dict(NARROW, classes=7))
    write_torch(root / "vgg16.pth", state)
    convert.convert("torchvision", str(root / "vgg16.pth"), "D", str(root / "ckpt"))
    return str(root / "ckpt")


def finetune_args(workdir, data_dir, init_from, *extra):
    return [
        "--config=configs/finetune.py",
        f"--workdir={workdir}",
        f"--config.init_from={init_from}",
        f"--config.data_dir={data_dir}",
        "--config.num_classes=10",
        "--config.batch_size=16",
        "--config.num_workers=0",
        "--config.num_train_steps=3",
        "--config.eval_scale=72",
        "--config.train_scale=(72,88)",
        "--config.log_every_steps=3",
        *extra,
    ]


def test_finetune_fc_layers_from_a_converted_checkpoint(converted, tiny_demo_dir, tmp_path):
    """configs/finetune.py with --config.trainable=fc: the net, widths and mean are the
    checkpoint's; fc8 is new with 10 classes; the conv layers are bit-for-bit the converted
    ones (no update, no weight decay) while fc6–fc8 move."""
    workdir = tmp_path / "fc"
    result = run_main(*finetune_args(workdir, tiny_demo_dir, converted, "--config.trainable=fc"))
    assert result.returncode == 0, result.stderr[-3000:]
    source = checkpoints.restore_params(converted)["params"]
    tuned = checkpoints.restore_params(str(workdir))["params"]
    assert tuned["fc8"]["kernel"].shape == (16, 10) and source["fc8"]["kernel"].shape == (16, 7)
    for name in source:
        if name.startswith("conv"):
            for a, b in zip(jax.tree.leaves(tuned[name]), jax.tree.leaves(source[name])):
                np.testing.assert_array_equal(a, b)
    for name in ("fc6", "fc7"):
        assert not np.array_equal(tuned[name]["kernel"], source[name]["kernel"])
    ran = json.loads((workdir / "config.json").read_text())
    net = pretrained.read_config(converted)
    assert (ran["model"], ran["width"], ran["fc_width"], ran["crop_size"]) == ("D", 1 / 16, 16, 64)
    np.testing.assert_allclose(ran["mean_rgb"], net["mean_rgb"])  # torchvision's mean, not ours
    model, variables, _ = pretrained.load_pretrained(str(workdir))  # and it loads as a net
    assert model.num_classes == 10
    folders = sorted(os.listdir(os.path.join(tiny_demo_dir, "train")))  # its own classes
    assert [c.name for c in pretrained.class_names(str(workdir))] == folders


def test_finetune_all_layers_moves_the_convs(converted, tiny_config, tmp_path):
    c = pretrained.inherit_net(_finetune_config(tiny_config, converted))
    options.validate(c)
    train.train_and_evaluate(c, str(tmp_path))
    source = checkpoints.restore_params(converted)["params"]
    tuned = checkpoints.restore_params(str(tmp_path))["params"]
    assert not np.array_equal(tuned["conv1_1"]["kernel"], source["conv1_1"]["kernel"])


@pytest.mark.parametrize("trainable", ["fc", "all"])
def test_frozen_conv_layers_keep_their_batch_norm_statistics(tiny_config, tmp_path, trainable):
    """A converted vgg16_bn fine-tuned with trainable=fc: its BN layers run in inference mode,
    so statistics and all conv-side parameters stay exactly as converted (as Keras does for
    frozen layers); with trainable=all the statistics follow the new data."""
    state = torchvision_state(CFG["D"], **dict(NARROW, classes=7), batch_norm=True)
    write_torch(tmp_path / "bn.pth", state)
    convert.convert("torchvision", str(tmp_path / "bn.pth"), "vgg16_bn", str(tmp_path / "ckpt"))
    c = pretrained.inherit_net(_finetune_config(tiny_config, str(tmp_path / "ckpt")))
    c.trainable = trainable
    train.train_and_evaluate(c, str(tmp_path / "run"))
    source = checkpoints.restore_params(str(tmp_path / "ckpt"))
    tuned = checkpoints.restore_params(str(tmp_path / "run"))
    same = [
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(tuned["batch_stats"]), jax.tree.leaves(source["batch_stats"])
        )
    ]
    assert all(same) if trainable == "fc" else not any(same)
    if trainable == "fc":
        for name in (n for n in source["params"] if n.startswith("conv")):
            for a, b in zip(
                jax.tree.leaves(tuned["params"][name]), jax.tree.leaves(source["params"][name])
            ):
                np.testing.assert_array_equal(a, b)


def _finetune_config(tiny_config, init_from):
    c = tiny_config
    c.model, c.init_from, c.init_layers, c.trainable = "", init_from, "all_but_fc8", "all"
    c.num_train_steps, c.learning_rate = 2, 1e-3
    return c


def test_init_layers_name_what_is_missing_or_mismatched(converted, tmp_path):
    variables = models.init_variables(
        models.create_model("D", 10, width=1 / 16, fc_width=16, crop_size=64),
        jax.random.key(0, impl="rbg"),
    )
    source = checkpoints.restore_params(converted)
    with pytest.raises(
        ValueError,
        match=r"layer fc8 has shape .* \(a new number of classes: "
        r"init_layers='all_but_fc8'\)",
    ):
        train.initialise_from(variables, source, "all")
    out = train.initialise_from(variables, source, "all_but_fc8")
    np.testing.assert_array_equal(out["params"]["fc7"]["kernel"], source["params"]["fc7"]["kernel"])
    assert out["params"]["fc8"] is variables["params"]["fc8"]
    # A checkpoint without the top (Keras's _notop files): conv layers only.
    notop = {"params": {k: v for k, v in source["params"].items() if k not in models.FC_LAYERS}}
    out = train.initialise_from(variables, notop, "conv")
    np.testing.assert_array_equal(
        out["params"]["conv5_3"]["bias"], source["params"]["conv5_3"]["bias"]
    )
    with pytest.raises(ValueError, match="layer fc6 is missing from the checkpoint"):
        train.initialise_from(variables, notop, "all_but_fc8")


def test_batch_norm_statistics_come_with_their_layers():
    model = models.create_model("vgg11_bn", 10, width=1 / 16, fc_width=16, crop_size=64)
    target = models.init_variables(model, jax.random.key(0, impl="rbg"))
    source = jax.tree.map(lambda a: a + 1.0, target)
    out = train.initialise_from(target, source, "net_a")
    np.testing.assert_array_equal(
        out["batch_stats"]["conv1_1_bn"]["mean"], source["batch_stats"]["conv1_1_bn"]["mean"]
    )
    np.testing.assert_array_equal(
        out["params"]["conv1_1_bn"]["scale"], source["params"]["conv1_1_bn"]["scale"]
    )
    assert out["batch_stats"]["conv4_1_bn"] is target["batch_stats"]["conv4_1_bn"]  # not net A's


def test_finetune_config_errors_are_one_line(converted, tiny_demo_dir, tmp_path):
    result = run_main(
        *finetune_args(tmp_path / "w", tiny_demo_dir, converted, "--config.init_layers=all")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "init_layers='all_but_fc8'" in result.stderr.strip().splitlines()[-1]
