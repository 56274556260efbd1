"""Class names travel with the weights; `python -m vggjax.predict` names what images show (issue 24)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from helpers import ROOT, init
from PIL import Image

from vggjax import checkpoints, classes, models, predict, storage
from vggjax.data import augment
from vggjax.evaluators import classification

NAMES = ("red fox", "blue whale", "green tree frog")
MEAN = (120.0, 110.0, 100.0)


def test_imagenet_classes_are_the_published_nets_thousand():
    imagenet = classes.imagenet()
    ids = [c.id for c in imagenet]
    assert len(ids) == len(set(ids)) == 1000
    assert imagenet[0] == ("n01440764", "tench")
    # The same order as tfds' imagenet2012 labels (what a run on ImageNet records), read off its file.
    tfds = pathlib.Path(importlib.util.find_spec("tensorflow_datasets").origin).parent
    labels = tfds / "datasets" / "imagenet2012" / "labels.txt"
    assert labels.read_text().split() == ids
    assert classes.named(["n02123045", "my_cat"]) == (("n02123045", "tabby"), ("my_cat", "my_cat"))


def test_top_k_names_the_most_probable_classes():
    named = classes.named(["a", "b", "c"])
    top = classes.top_k(np.log([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]), named, k=2)
    assert [(p.index, p.id, p.name) for p in top[0]] == [(1, "b", "b"), (2, "c", "c")]
    np.testing.assert_allclose([p.probability for p in top[1]], [0.6, 0.3], rtol=1e-6)
    assert classes.top_k(np.array([0.1, 0.7, 0.2]), named, 1, from_logits=False)[0].index == 1


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A narrow 3-class net A (32 crops) saved with its class names, as convert or training do."""
    workdir = str(tmp_path_factory.mktemp("three"))
    model = models.create_model("A", 3, width=1 / 16, fc_width=32, crop_size=32, kernel_init="he")
    variables = init(model)
    fc8 = variables["params"]["fc8"]  # small logits: probabilities that are not all 0 or 1
    fc8["kernel"] = fc8["kernel"] * 0.05
    checkpoints.save_params(workdir, variables)
    config = {f: getattr(model.spec, f) for f in models.fields_fixing("conv", "fc", "fc8")}
    named = [classes.Class(name.replace(" ", "_"), name) for name in NAMES]
    config.update(mean_rgb=list(MEAN), classes=classes.to_json(named))
    storage.write_json(os.path.join(workdir, checkpoints.CONFIG_FILE), config)
    return workdir, model, variables


def test_a_fine_tune_of_the_same_classes_keeps_their_names(three_classes):
    workdir, _, _ = three_classes
    ids = [name.replace(" ", "_") for name in NAMES]
    config = ml_collections.ConfigDict({"init_from": workdir, "num_classes": 3})
    assert [c["name"] for c in classes.run_record(config, ids)["classes"]] == list(NAMES)
    other = classes.run_record(config, ["cat", "dog", "n01440764"])
    assert other["num_classes"] == 3 and other["classes"][2] == {"id": "n01440764", "name": "tench"}


def _write_images(folder):
    """Three small images of different shapes (PNG and JPEG) and one that is not an image."""
    rng = np.random.default_rng(0)
    os.makedirs(folder / "more")
    files = [folder / "a.png", folder / "more" / "b.jpg", folder / "c.png"]
    for file, shape in zip(files, [(40, 56), (48, 48), (60, 44)]):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(file)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    return [str(f) for f in files]


def _predict_command(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(
        [sys.executable, "-m", "vggjax.predict", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_prints_the_top_class_model_apply_gives(three_classes, tmp_path):
    workdir, model, variables = three_classes
    files = _write_images(tmp_path / "images")
    result = _predict_command(f"--weights={workdir}", "--top_k=2", str(tmp_path / "images"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 of 4 files" in result.stderr and "broken.jpg" in result.stderr
    lines = result.stdout.splitlines()
    printed = {line: lines[i + 1] for i, line in enumerate(lines) if not line.startswith(" ")}
    q = classification.centre_crop_scale(32)
    for file in files:
        with open(file, "rb") as f:
            image = augment.rescale_smallest_side(augment.decode_image(f.read()), q)
        x = augment.subtract_mean(augment.center_crop(image, 32), MEAN)[None]
        logits = np.asarray(model.apply(variables, x))[0]
        best = classes.top_k(logits, classes.named(NAMES), 1)[0]
        assert f"{best.probability:7.2%}  {best.name}  (" in printed[file]
    assert len(printed) == 3 and len(lines) == 9  # file, then its top 2


def test_predict_function_writes_jsonl_and_refuses_what_it_cannot_do(three_classes, tmp_path):
    workdir, _, _ = three_classes
    files = _write_images(tmp_path)
    result = predict.predict(workdir, files[:2], protocol="dense", k=3, batch_size=8)
    assert list(result.top) == files[:2] and not result.skipped
    assert sorted(p.name for p in result.top[files[0]]) == sorted(NAMES)
    predict._write(result, str(tmp_path / "top.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert rows[1]["file"] == files[1] and set(rows[1]["top"][0]) == {
        "index",
        "id",
        "name",
        "probability",
    }
    with pytest.raises(predict.UserError, match="dense tests one scale"):
        predict.predict(workdir, files, protocol="dense", scales=(40, 48))
    with pytest.raises(predict.UserError, match="no such file"):
        predict.predict(workdir, [str(tmp_path / "missing.jpg")])


def test_predict_dense_centred_is_the_net_on_the_image_less_half_its_margins(
    three_classes, tmp_path
):
    """a.png (40 × 56) at Q = 40: the 32 crop's windows leave 8 and 24 pixels out; centred,
    the map is the net's on the image less 4 rows at the top and 12 columns at the left."""
    workdir, model, variables = three_classes
    file = _write_images(tmp_path)[0]
    result = predict.predict(
        workdir, [file], "dense", 3, (40,), batch_size=8, dense_alignment="centred"
    )
    with open(file, "rb") as f:
        x = augment.subtract_mean(augment.decode_image(f.read()), MEAN)
    scores = [
        np.asarray(model.apply(variables, im[None, 4:, 12:], dense=True)).mean((0, 1, 2))
        for im in (x, x[:, ::-1])
    ]
    expected = np.mean([np.exp(z) / np.exp(z).sum() for z in scores], 0)
    got = {p.index: p.probability for p in result.top[file]}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=1e-5)
    with pytest.raises(predict.UserError, match="dense_alignment must be one of"):
        predict.predict(workdir, [file], "dense", dense_alignment="diagonal")


def test_predict_mistakes_get_one_line_and_status_2(tmp_path):
    result = _predict_command(str(tmp_path))
    assert (result.returncode, result.stderr) == (
        2,
        "vggjax.predict: error: --weights is required: a published net (torchvision:vgg16) "
        "or a workdir\n",
    )
