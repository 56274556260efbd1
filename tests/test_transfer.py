"""Appendix B: dense-net features, linear SVMs on them, and the scores the paper reports."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_main

from vggjax import options, pretrained, recipe
from vggjax.data import augment
from vggjax.errors import UserError
from vggjax.evaluators import features, transfer


def transfer_config(data_dir, checkpoints, scales=(72, 88, 104), aggregation="stack"):
    c = recipe.paper_recipe("A")
    c.dataset, c.data_dir, c.crop_size, c.num_workers = "folder", data_dir, 64, 0
    c.eval.batch_size = 16
    c.features.checkpoints, c.features.scales = tuple(checkpoints), scales
    c.features.aggregation = aggregation
    return c


def fc7_descriptor(model, variables, image):
    """fc7's ReLU activations averaged over the dense map, read off Flax's captured
    intermediates: a path independent of the `output=` argument `features` uses."""
    _, state = model.apply(variables, image[None], dense=True, capture_intermediates=True)
    return np.asarray(jax.nn.relu(state["intermediates"]["fc7"]["__call__"][0])).mean((1, 2))[0]


def test_features_mode_writes_the_papers_descriptors(trained_demo_net, tiny_demo_dir, tmp_path):
    """`--mode=features` on two nets and two scales, stacked: shapes, unit norms, ids; one
    image's descriptor recomputed from the net applied to it alone."""
    workdir = tmp_path / "features"
    result = run_main(
        "--config=configs/demo.py",
        "--mode=features",
        f"--workdir={workdir}",
        "--config.dataset=folder",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.num_workers=0",
        "--config.eval.batch_size=8",
        "--config.features.scales=(72,104)",
        f"--config.features.checkpoints=('{trained_demo_net}','{trained_demo_net}')",
        "--config.features.splits=('val',)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "features_val.npz: 40 images × 128 features" in result.stderr
    data = np.load(workdir / "features_val.npz")
    x = data["features"]
    assert x.shape == (40, 2 * 2 * 32) and not data["bad"].any() and int(data["num_classes"]) == 10
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(x[:, :64], x[:, 64:])  # the same net twice: equal halves
    assert list(data["setting_scales"]) == [72, 104]
    assert data["ids"][0] == "circle/0000.jpg" and data["labels"][-1] == 9

    model, variables, preprocess = pretrained.load_pretrained(trained_demo_net)
    with open(os.path.join(tiny_demo_dir, "val", data["ids"][5]), "rb") as f:
        image = augment.decode_image(f.read())
    per_scale = []
    for q in (72, 104):
        x_q = preprocess(augment.rescale_smallest_side(image, q))
        d = (
            fc7_descriptor(model, variables, x_q) + fc7_descriptor(model, variables, x_q[:, ::-1])
        ) / 2
        per_scale.append(d)
    alone = np.concatenate(per_scale) / np.linalg.norm(np.concatenate(per_scale))
    np.testing.assert_allclose(x[5, :64] * np.sqrt(2), alone, atol=1e-5)


def test_svm_on_demo_features_beats_chance_by_a_wide_margin(
    trained_demo_net, tiny_demo_dir, tmp_path, caplog
):
    """`--mode=transfer`'s path: 3 scales stacked, C chosen on held-out images. Control: the
    same pipeline with shuffled training labels stays near chance."""
    c = transfer_config(tiny_demo_dir, [trained_demo_net])
    result = transfer.run(c, str(tmp_path))
    saved = json.loads((tmp_path / "transfer_results.json").read_text())
    assert saved["mean_class_recall"] == result["mean_class_recall"]
    assert (result["train_images"], result["test_images"], result["feature_dim"]) == (200, 40, 96)
    assert result["chance_recall"] == 0.1
    assert result["mean_class_recall"] >= 0.4 and result["mean_ap"] >= 0.4, result

    train = features.load(features.path_of(str(tmp_path), "train"))  # written by the run
    test = features.load(features.path_of(str(tmp_path), "val"))
    shuffled = dict(train, labels=np.random.default_rng(0).permutation(train["labels"]))
    control = transfer.evaluate_svm(shuffled, test, 10, c.transfer.c_values)
    assert control["mean_class_recall"] <= 0.25, control

    caplog.set_level("INFO")  # a second run reuses the features made with the same settings
    assert transfer.run(c, str(tmp_path))["mean_class_recall"] == result["mean_class_recall"]
    assert "Using the features" in caplog.text

    # The Caltech protocol: random splits of the training folder alone, mean ± std. (These are
    # the images the net was trained on, so the figure, 78% here, flatters the features.)
    c.transfer.random_splits, c.transfer.train_per_class, c.transfer.test_per_class = 3, 10, 10
    splits = transfer.run(c, str(tmp_path))
    assert [(r["train_images"], r["test_images"]) for r in splits["splits"]] == [(100, 100)] * 3
    assert splits["mean_class_recall"] >= 0.4 and splits["mean_class_recall_std"] > 0, splits


def test_features_dense_alignment_centres_the_map(trained_demo_net, tiny_demo_dir, tmp_path):
    """features.dense_alignment=centred: an image's descriptor, extracted batched with one of
    another shape, is that of the image (and of its mirror) less half of each side's unseen
    margin at the top and left, alone; top-left's descriptors differ."""
    for name in ("circle/0000.jpg", "star/0002.jpg"):  # landscape and portrait
        (tmp_path / "val" / os.path.dirname(name)).mkdir(parents=True)
        shutil.copy(os.path.join(tiny_demo_dir, "val", name), tmp_path / "val" / name)
    c = transfer_config(str(tmp_path), [trained_demo_net], scales=(88,))
    extracted = {}
    for alignment in ("top_left", "centred"):
        c.features.dense_alignment = alignment
        extracted[alignment] = features.extract(c, trained_demo_net, "val")["features"]
    assert np.abs(extracted["top_left"] - extracted["centred"]).max(1).min() > 1e-3  # each image
    model, variables, preprocess = pretrained.load_pretrained(trained_demo_net)
    with open(tmp_path / "val" / "circle" / "0000.jpg", "rb") as f:
        x = preprocess(augment.rescale_smallest_side(augment.decode_image(f.read()), 88))
    dy, dx = np.asarray(x.shape[:2]) % 32 // 2  # the crop is a multiple of 32
    alone = [fc7_descriptor(model, variables, im[dy:, dx:]) for im in (x, x[:, ::-1])]
    np.testing.assert_allclose(
        extracted["centred"][0], features.l2_normalise(np.mean(alone, 0)), atol=1e-5
    )
    c.features.dense_alignment = "diagonal"
    with pytest.raises(UserError, match="config.features.dense_alignment must be one of"):
        options.validate(c)


def test_feature_files_are_reused_only_with_the_same_settings(tmp_path):
    about = dict(checkpoints=["/a"], scales=[256, 384], aggregation="stack", flip=True)
    about["dense_alignment"] = "top_left"
    path = str(tmp_path / "f.npz")
    features.save(path, dict(features=np.ones((2, 3)), labels=np.zeros(2)), about)
    assert features.load(path, about)["features"].shape == (2, 3)
    assert features.load(path, dict(about, scales=[256])) is None
    assert features.load(path, dict(about, aggregation="average")) is None
    assert features.load(path, dict(about, dense_alignment="centred")) is None
    assert features.load(str(tmp_path / "missing.npz"), about) is None


def test_aggregation_over_scales():
    a, b = np.array([[3.0, 0.0]]), np.array([[0.0, 4.0]])
    np.testing.assert_allclose(features.aggregate([a, b], "stack"), [[0.6, 0, 0, 0.8]])
    np.testing.assert_allclose(features.aggregate([a, b], "average"), [[0.6, 0.8]])
    np.testing.assert_array_equal(features.l2_normalise(np.zeros((1, 3))), 0)  # undecodable
    with pytest.raises(ValueError, match="aggregation must be one of"):
        features.aggregate([a], "max")


def test_svm_solves_the_squared_hinge_problem():
    """x = ±1 with labels ±1: ½w² + C·2(1 − w)² is least at w = 4C/(1 + 4C), b = 0."""
    x = jnp.array([[1.0], [-1.0]])
    positives = jnp.array([[True], [False]])
    for c in (0.1, 1.0, 10.0):
        w, b = transfer.fit_linear_svm(x, positives, c)
        np.testing.assert_allclose(w[0, 0], 4 * c / (1 + 4 * c), rtol=1e-4)
        np.testing.assert_allclose(b[0], 0.0, atol=1e-4)


def test_svm_separates_classes_one_vs_rest():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 20))
    labels = np.repeat(np.arange(5), 30)
    x = centres[labels] + rng.normal(0, 0.3, (150, 20))
    params = transfer.fit_linear_svm(jnp.asarray(x), transfer.one_hot(labels, 5), 1.0)
    assert np.mean(transfer.scores_of(params, x).argmax(1) == labels) == 1.0


def test_average_precision_all_point_and_eleven_point():
    scores, positive = np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False])
    # Hits at ranks 1 and 3: precision 1 at recall ½, ⅔ at recall 1.
    assert transfer.average_precision(scores, positive) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert transfer.average_precision(scores, positive, eleven_point=True) == pytest.approx(
        (6 * 1 + 5 * 2 / 3) / 11
    )
    assert transfer.average_precision(-scores, ~positive) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # A ranking with every positive first scores 1, whatever the scale of the scores.
    assert (
        transfer.average_precision(np.array([5.0, 4, -1, -2]), np.array([True, True, False, False]))
        == 1.0
    )


def test_mean_class_recall_weighs_classes_equally():
    labels = np.array([0] * 8 + [1] * 2)
    scores = np.zeros((10, 2))
    scores[:, 0] = 1  # always class 0: accuracy 80%, mean class recall 50%
    assert transfer.mean_class_recall(scores, labels) == 0.5


def test_held_out_takes_a_fraction_of_each_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] + [3] * 2)
    mask = transfer.held_out(labels, 0.2)
    assert [int(mask[labels == k].sum()) for k in range(4)] == [2, 1, 0, 1]
    mask = transfer.held_out(labels, 0.9)  # never a whole class
    assert [int(mask[labels == k].sum()) for k in range(4)] == [9, 4, 0, 1]


def test_random_splits_are_disjoint_and_per_class():
    labels = np.repeat(np.arange(3), [5, 8, 4])
    splits = transfer.random_splits(labels, 3, 2, count=4)
    assert len(splits) == 4 and not np.array_equal(splits[0][0], splits[1][0])
    for train, test in splits:
        assert not set(train) & set(test)
        assert np.bincount(labels[train]).tolist() == [3, 3, 3]
        assert np.bincount(labels[test]).tolist() == [2, 2, 1]  # up to 2: class 2 has 1 left
    with pytest.raises(ValueError, match="class 2 has 4 images; the random splits take 4"):
        transfer.random_splits(labels, 4, 2, count=1)


def test_one_image_per_class_needs_a_single_c():
    data = dict(features=np.eye(3, 4), labels=np.arange(3), bad=np.zeros(3, bool))
    with pytest.raises(ValueError, match="every class has a single training image"):
        transfer.evaluate_svm(data, data, 3, (0.1, 1.0))
    result = transfer.evaluate_svm(data, data, 3, (1.0,))
    assert result["c"] == 1.0 and result["mean_class_recall"] == 1.0
