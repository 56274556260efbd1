"""Localisation (Appendix A, issue 13): boxes, their loss and merging, the error criteria, boxes
through the augmentation, the annotation readers, the heads of the two protocols, and the demo
trained and tested end to end through the command line."""

import json
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import init, load_config, narrow, run_main
from PIL import Image

from vggjax import checkpoints, localise, models, objectives, options, pretrained
from vggjax.data import augment, boxes, pipeline, sources
from vggjax.errors import UserError
from vggjax.evaluators import localisation as localise_eval


def test_iou_hand_worked():
    a = np.array([0.0, 0.0, 2.0, 2.0])
    assert localise.iou(a, a) == 1.0
    assert localise.iou(a, np.array([1.0, 0.0, 3.0, 2.0])) == pytest.approx(2 / 6)
    assert localise.iou(np.array([0.0, 0, 4, 4]), a) == pytest.approx(4 / 16)
    assert localise.iou(a, np.array([2.0, 0, 3, 2])) == 0.0  # touching edges share no area
    assert localise.iou(a, np.array([5.0, 5, 6, 6])) == 0.0
    assert localise.iou(a, np.array([1.0, 1, 1, 3])) == 0.0  # an empty box
    many = localise.iou(a[None], np.array([[0.0, 0, 2, 2], [1, 0, 3, 2]]))
    np.testing.assert_allclose(many, [1.0, 1 / 3])
    np.testing.assert_allclose(
        localise.iou(jnp.asarray(a[None]), jnp.asarray([[1.0, 0, 3, 2]])), [1 / 3]
    )


def test_encode_decode_are_centre_width_height_in_crop_units():
    box = np.array([[10.0, 20.0, 50.0, 40.0]])
    np.testing.assert_allclose(localise.encode(box, 100), [[0.3, 0.3, 0.4, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(localise.decode(localise.encode(box, 64), 64), box, rtol=1e-5)


def test_error_criteria_hand_worked():
    truth = [np.array([[0.0, 0, 2, 1]]), np.array([[0.0, 0, 2, 1], [5, 5, 6, 6]]), np.zeros((1, 4))]
    half = np.array([0.0, 0, 1, 1])  # IoU exactly 0.5 with [0, 0, 2, 1]: not above it, an error
    good = np.array([0.0, 0, 1.5, 1])  # IoU 0.75
    other = np.array([5.0, 5, 6, 6])  # right on the second image's second box
    bad = np.array([False, False, True])
    assert localise.gt_class_error(np.stack([half, other, good]), truth, bad) == pytest.approx(
        2 / 3
    )
    assert localise.gt_class_error(np.stack([good, other, good]), truth, ~bad) == 1.0
    labels = np.array([3, 7, 1])
    classes = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 0, 1], [1, 2, 3, 4, 5]])
    guesses = np.zeros((3, 5, 4))
    guesses[0, 3], guesses[0, 0] = good, good  # right class (4th guess) and box: right
    guesses[1, 1] = other  # a right box for class 8, but the image is class 7: wrong
    guesses[2, 0] = good  # right class and box, but undecodable: wrong
    assert localise.top5_error(classes, guesses, labels, truth, bad) == pytest.approx(2 / 3)


def test_merging_keeps_clusters_apart_and_averages_each():
    left = np.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 2, 10, 12]])
    right = np.array([[50.0, 50, 60, 70], [52, 50, 62, 70]])
    merged, scores = localise.merge(
        np.concatenate([left, right]), np.array([1, 2, 3, 0.5, 0.5]), 0.5
    )
    order = np.argsort(merged[:, 0])
    np.testing.assert_allclose(merged[order], [left.mean(0), right.mean(0)])
    np.testing.assert_allclose(scores[order], [6, 1])
    same, _ = localise.merge(left, np.ones(3), 0.99)  # no pair is that close: nothing merges
    np.testing.assert_allclose(same, left)
    best, score = localise.best_box(np.concatenate([right, left]), np.ones(5), 0.5)
    np.testing.assert_allclose(best, left.mean(0))  # three boxes outrate two
    assert score == 3


def test_losses_scr_and_pcr():
    target = jnp.asarray([[0.5, 0.5, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    batch = dict(label=jnp.asarray([2, 0]), box=target)
    scr = jnp.asarray([[0.5, 0.5, 0.25, 0.75], [0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(objectives.box_loss(scr, batch), [0.125, 0.0], atol=1e-7)
    pcr = jnp.zeros((2, 12)).at[0, 8:12].set(target[0]).at[1, 0:4].set(target[1] + 1)
    np.testing.assert_allclose(objectives.box_loss(pcr, batch), [0.0, 2.0], atol=1e-6)
    grads = jax.grad(lambda o: objectives.box_loss(o, batch).sum())(pcr)
    assert np.count_nonzero(grads[0]) == 0  # only the ground-truth class's four outputs learn
    assert np.count_nonzero(grads[1, 4:]) == 0 and np.count_nonzero(grads[1, :4]) == 4
    errors = objectives.box_errors(pcr, batch)["loc_error"]  # box 0 exact; box 1 off by 1
    np.testing.assert_array_equal(errors, [0.0, 1.0])
    assert (
        models.model_from_config(dict(model="A", num_classes=7, objective="pcr")).num_classes == 28
    )
    assert (
        models.model_from_config(dict(model="A", num_classes=7, objective="scr")).num_classes == 4
    )


def test_window_maps_boxes_through_rescale_crop_and_flip():
    window = augment.Window((100, 200), (10, 20), 50, flipped=True)
    # [0.25, 0.5, 0.5, 0.75] of a 200×100 image: [50, 50, 100, 75]; the crop from (x 20, y 10):
    # [30, 40, 80, 65]; mirrored in 50 pixels: [-30, 40, 20, 65].
    np.testing.assert_allclose(
        window.boxes(np.array([[0.25, 0.5, 0.5, 0.75]])), [[-30, 40, 20, 65]]
    )


def _rectangle(size, box):
    image = np.zeros((*size, 3), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 255
    return image


def _bright_box(crop):
    """The box of the bright pixels of a crop (mean 0, no colour shift): x0, y0, x1, y1."""
    ys, xs = np.nonzero(crop[..., 0] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def test_boxes_follow_rescale_crop_and_flip_of_real_images():
    rng, flips = np.random.default_rng(0), set()
    for seed in range(12):
        h, w = rng.integers(70, 100, 2)
        x0, y0 = rng.integers(25, 40, 2)
        box = (x0, y0, x0 + rng.integers(15, 30), y0 + rng.integers(15, 30))
        fractions = np.array([box], float) / [w, h, w, h]
        crop, window = augment.train_crop(
            _rectangle((h, w), box), np.random.default_rng(seed), crop=48, s_min=56, s_max=80
        )
        expected = np.clip(window.boxes(fractions)[0], 0, 48)
        if min(expected[2] - expected[0], expected[3] - expected[1]) < 2:  # (nearly) cropped out
            continue
        np.testing.assert_allclose(_bright_box(crop), expected, atol=1.01)
        target = localise.decode(boxes.target(window, fractions), 48)  # the whole box, even cut
        np.testing.assert_allclose(target, window.boxes(fractions)[0], atol=1e-4)
        flips.add(window.flipped)
    assert flips == {True, False}
    outside = augment.Window((100, 100), (0, 0), 48)
    assert boxes.target(outside, np.array([[0.6, 0.6, 0.9, 0.9]])) is None  # masked, not taught


@pytest.fixture(scope="module")
def rectangles(tmp_path_factory):
    """A folder set of white rectangles on black (2 classes), PNG, with boxes.json."""
    root = tmp_path_factory.mktemp("rectangles")
    rng, found = np.random.default_rng(1), {}
    for split, count in (("train", 12), ("val", 4)):
        for i in range(count):
            h, w = (int(v) for v in rng.integers(64, 100, 2))
            x0, y0 = w // 2 - int(rng.integers(8, 16)), h // 2 - int(rng.integers(8, 16))
            box = [x0, y0, x0 + int(rng.integers(20, 30)), y0 + int(rng.integers(20, 30))]
            relpath = f"{split}/{'ab'[i % 2]}/{i:02d}.png"
            os.makedirs(root / os.path.dirname(relpath), exist_ok=True)
            Image.fromarray(_rectangle((h, w), box)).save(root / relpath)
            found[relpath] = box if i % 3 else [box, [0, 0, 4, 4]]  # some with a second box
    Image.fromarray(_rectangle((64, 64), (9, 9, 30, 30))).save(root / "val/a/unlisted.png")
    (root / "boxes.json").write_text(json.dumps(found))
    return str(root)


def _boxes_config(data_dir):
    return ml_collections.ConfigDict(
        dict(
            dataset="folder",
            data_dir=data_dir,
            objective="pcr",
            batch_size=8,
            crop_size=48,
            train_scale=(56, 80),
            eval_scale=64,
            mean_rgb=(0.0, 0.0, 0.0),
            colour_shift_std=0.0,
            seed=0,
            num_workers=0,
        )
    )


def test_pipeline_batches_carry_each_crops_box(rectangles):
    """The training pipeline end to end: each crop's target box is where its rectangle is,
    through decoding, rescaling, cropping and flipping (the small second boxes show less)."""
    config = _boxes_config(rectangles)
    data = iter(pipeline.train_dataset(config))
    for _ in range(3):
        batch = next(data)
        assert batch["box"].shape == (8, 4) and batch["mask"].sum() >= 6
        for image, params in zip(
            batch["image"][batch["mask"] > 0], batch["box"][batch["mask"] > 0]
        ):
            expected = np.clip(localise.decode(params, 48), 0, 48)
            np.testing.assert_allclose(_bright_box(image), expected, atol=1.5)
    data.close()
    val = next(iter(pipeline.eval_dataset(config)))
    assert val["box"].shape == (8, 4) and val["mask"].sum() == 4  # 4 images, padded to 8


def test_folder_boxes_file_and_its_mistakes(rectangles, tmp_path):
    source = boxes.boxed_source(_boxes_config(rectangles), "val")
    assert len(source) == 4 and source.labels == [0, 0, 1, 1]
    element = source[0]
    assert element["boxes"].shape == (2, 4) and 0 < element["boxes"].max() <= 1
    np.testing.assert_allclose(source.truth(0), element["boxes"])
    assert len(sources.make_source(_boxes_config(rectangles), "val")) == 5  # one not in boxes.json
    with pytest.raises(boxes.UserError, match="no .*boxes.json"):
        boxes.read_boxes_json(str(tmp_path / "boxes.json"))
    (tmp_path / "boxes.json").write_text('{"train/a/0.png": [5, 5, 2, 9]}')
    with pytest.raises(boxes.UserError, match="x0 < x1"):
        boxes.read_boxes_json(str(tmp_path / "boxes.json"))


VOC = """<annotation>
  <folder>{folder}</folder><filename>{stem}</filename>
  <source><database>ILSVRC_2012</database></source>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segmented>0</segmented>
  {objects}
</annotation>"""
OBJECT = """<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
    <difficult>0</difficult><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax>
    <ymax>{3}</ymax></bndbox></object>"""


def _write_voc(path, stem, size, objects):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(OBJECT.format(*box, name=name) for name, box in objects)
    path.write_text(
        VOC.format(folder=path.parent.name, stem=stem, w=size[1], h=size[0], objects=text)
    )


class _Records(sources.Source):
    """A stand-in for TFDS's records: ids are file names, read only by reading an element."""

    class_names = ("n01440764", "n01443537")

    def __init__(self):
        self.items = [("n01440764_10026.JPEG", 0), ("n01443537_7.JPEG", 1), ("n01440764_3.JPEG", 0)]
        self.reads = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.reads += 1
        name, label = self.items[index]
        return dict(data=b"", label=label, id=name)


def test_ilsvrc_xml_annotations_matched_to_records_by_file_name(tmp_path, monkeypatch):
    root = tmp_path / "bbox"
    _write_voc(
        root / "n01440764" / "n01440764_10026.xml",
        "n01440764_10026",
        (375, 500),
        [("n01440764", (0, 11, 249, 330)), ("n01443537", (5, 5, 10, 10))],
    )
    _write_voc(
        root / "val" / "ILSVRC2012_val_00000001.xml",
        "ILSVRC2012_val_00000001",
        (333, 500),
        [("n01751748", (10, 20, 30, 40))] * 2,
    )
    _write_voc(
        root / "n01443537" / "n01443537_7.xml", "%s", (100, 80), [("n01440764", (1, 2, 3, 4))]
    )
    found = boxes.read_voc_dir(str(root))
    assert set(found) == {"n01440764_10026", "ILSVRC2012_val_00000001", "n01443537_7"}
    first = found["n01440764_10026"]
    assert first.size == (375, 500) and first.names == ("n01440764", "n01443537")
    np.testing.assert_array_equal(first.boxes, [[0, 11, 250, 331], [5, 5, 11, 11]])
    assert len(found["ILSVRC2012_val_00000001"].boxes) == 2

    monkeypatch.setenv("VGGJAX_CACHE", str(tmp_path / "cache"))
    records = _Records()
    monkeypatch.setattr(sources, "make_source", lambda config, split: records)
    config = ml_collections.ConfigDict(
        dict(dataset="imagenet2012", data_dir=str(tmp_path), loc=dict(annotations=str(root)))
    )
    source = boxes.boxed_source(config, "train")
    # The second record's only box is of another class, the third has no file: one image left.
    assert len(source) == 1 and source.labels == [0] and records.reads == 3
    np.testing.assert_allclose(source.truth(0), [[0, 11 / 375, 250 / 500, 331 / 375]])
    boxes.boxed_source(config, "train")
    assert records.reads == 3  # the records' file names came from the cache
    config.loc.annotations = ""
    with pytest.raises(boxes.UserError, match="config.loc.annotations"):
        boxes.boxed_source(config, "train")


def test_centre_and_dense_boxes_agree_at_the_crop_size():
    """The dense form's box at crop size equals the classic form's (SCR and PCR), and a dense
    map's positions give boxes in their own windows, as fractions of the image."""
    classifier = narrow("A")
    cls_variables = init(classifier)
    for objective in ("scr", "pcr"):
        loc = models.model_from_config(
            dict(
                model="A",
                num_classes=10,
                objective=objective,
                width=1 / 16,
                fc_width=32,
                crop_size=64,
                kernel_init="he",
            )
        )
        variables = {"loc": init(loc), "cls": cls_variables}
        images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3)) * 50
        sizes = jnp.full((2, 2), 64)
        classes = jnp.asarray([[3, 1, 4, 0, 2], [9, 8, 7, 6, 5]])
        dense = localise_eval.dense_boxes(
            loc,
            variables,
            images,
            sizes,
            classes,
            classifier=classifier,
            shift=(0, 0, 0),
            positions=2,
        ).reshape(2, 2, 5, 5)
        assert np.isnan(dense[:, 1]).all()  # one position only at the crop size
        for k in range(5):
            centre = localise_eval.centre_box(loc, variables, images, sizes, label=classes[:, k])
            np.testing.assert_allclose(np.clip(dense[:, 0, k, :4], 0, 1), centre, atol=1e-5)
        if objective == "pcr":  # each class its own box
            assert not np.allclose(dense[:, 0, 0, :4], dense[:, 0, 1, :4])


def test_dense_boxes_lie_in_their_windows():
    """With fc8 predicting a fixed box (centre of the window, half its side), position (i, j)
    gives that box in the window at (32 i, 32 j); positions past `positions` are spread."""
    loc = models.model_from_config(
        dict(model="A", num_classes=3, objective="scr", width=1 / 16, fc_width=32, crop_size=64)
    )
    variables = {"loc": init(loc), "cls": init(narrow("A"))}
    variables["loc"]["params"]["fc8"] = dict(
        kernel=jnp.zeros((32, 4)), bias=jnp.asarray([0.5, 0.5, 0.5, 0.5])
    )
    images, sizes = jnp.zeros((1, 128, 160, 3)), jnp.asarray([[128, 160]])
    classes = jnp.zeros((1, 5), jnp.int32)
    out = localise_eval.dense_boxes(
        loc,
        variables,
        images,
        sizes,
        classes,
        classifier=narrow("A"),
        shift=(0, 0, 0),
        positions=12,
    )
    rows = np.asarray(out).reshape(12, 5, 5)[:, 0, :4] * [160, 128, 160, 128]
    windows = [(32 * i, 32 * j) for i in range(3) for j in range(4)]  # a 3 × 4 map
    expected = [[x + 16, y + 16, x + 48, y + 48] for y, x in windows]
    np.testing.assert_allclose(rows, expected, atol=1e-3)
    spread = localise_eval.dense_boxes(
        loc, variables, images, sizes, classes, classifier=narrow("A"), shift=(0, 0, 0), positions=5
    )
    rows = np.asarray(spread).reshape(5, 5, 5)[:, 0, :4] * [160, 128, 160, 128]
    picked = [windows[k * 12 // 5] for k in range(5)]
    np.testing.assert_allclose(
        rows, [[x + 16, y + 16, x + 48, y + 48] for y, x in picked], atol=1e-3
    )
    assert localise_eval.max_positions(384, 224, 3.0) == 6 * 30  # 384 × 1152: a 6 × 30 map


class _Given(NamedTuple):
    """A stand-in for a net in the dense form whose map (N, h, w, channels) is given: all that
    `dense_boxes` reads of a VGG, so protocol 2 runs on maps whose answer is known, no net."""

    crop_size: int
    out: np.ndarray

    def apply(self, variables, images, dense, sizes):
        assert dense and images.shape[1:3] == (128, 160)
        return jnp.asarray(self.out, jnp.float32)


IMAGE = np.array([[128, 160]])  # (h, w): a 3 × 4 map of 64-pixel windows 32 pixels apart
WINDOWS = [(i, j) for i in range(3) for j in range(4)]  # map positions (row, column), in order
PX = np.array([160, 128, 160, 128])  # box pixels → fractions of the image


def _protocol2(loc_map, cls_logits, classes, positions=12):
    """`dense_boxes` of the given maps at the image above: (positions, TOP, 5) rows."""
    out = localise_eval.dense_boxes(
        _Given(64, loc_map),
        {"loc": None, "cls": None},
        jnp.zeros((1, 128, 160, 3)),
        jnp.asarray(IMAGE),
        jnp.asarray([classes], jnp.int32),
        classifier=_Given(64, cls_logits),
        shift=(0, 0, 0),
        positions=positions,
    )
    return np.asarray(out).reshape(positions, localise_eval.TOP, 5)


@pytest.mark.parametrize("regression", [4, 24], ids=["scr", "pcr"])
def test_each_box_is_rated_by_its_class_posterior_at_its_own_position(regression):
    """Protocol 2's rows against a loop over hand-built maps: position (i, j)'s box for slot m's
    class (PCR: that class's four outputs; SCR: the one box) in its window, and the classifier's
    posterior of that class at (i, j). A permuted class or a shifted map gives other rows."""
    rng = np.random.default_rng(0)
    posterior = rng.dirichlet(np.full(6, 0.5), (1, 3, 4))  # 6 classes, every position its own
    loc_map = rng.uniform(0.2, 0.8, (1, 3, 4, regression))
    classes = [4, 2, 0, 5, 1]
    expected = np.zeros((12, 5, 5))
    for k, (i, j) in enumerate(WINDOWS):
        for m, c in enumerate(classes):
            first = 4 * c if regression > 4 else 0  # PCR: class c's four outputs
            cx, cy, w, h = 64 * loc_map[0, i, j, first : first + 4]
            x, y = 32 * j + cx, 32 * i + cy
            expected[k, m, :4] = np.array([x - w / 2, y - h / 2, x + w / 2, y + h / 2]) / PX
            expected[k, m, 4] = posterior[0, i, j, c]
    logits = np.log(posterior)
    np.testing.assert_allclose(_protocol2(loc_map, logits, classes), expected, atol=1e-5)
    spread = [k * 12 // 5 for k in range(5)]  # fewer positions kept: boxes and ratings alike
    np.testing.assert_allclose(_protocol2(loc_map, logits, classes, 5), expected[spread], atol=1e-5)
    # The check has teeth: the rating column differs under a permuted class or a shifted map.
    permuted = _protocol2(loc_map, logits, classes[1:] + classes[:1])
    assert not np.allclose(permuted[..., 4], expected[..., 4], atol=1e-3)
    shifted = _protocol2(loc_map, np.roll(logits, 1, axis=2), classes)
    assert not np.allclose(shifted[..., 4], expected[..., 4], atol=1e-3)


def _rows(*boxes_and_scores):
    """One image's `dense_boxes` row for one slot's (box, score) per position, the other slots
    empty (NaN): (1, positions · TOP · 5)."""
    rows = np.full((len(boxes_and_scores), localise_eval.TOP, 5), np.nan, np.float32)
    for k, (box, score) in enumerate(boxes_and_scores):
        rows[k, 0] = [*box, score]
    return rows.reshape(1, -1)


def test_guesses_merge_the_union_of_scales_and_keep_the_best_rated_cluster():
    """Slot 0 of one image: three boxes of cluster A rated 0.15, 0.15 (one scale) and 0.1 (the
    other) against one box B rated 0.35. A's sum wins only in the union; the highest single
    rating, or one scale alone, picks B. Each slot keeps to its own rows, boxes are cut to the
    image, and an image without boxes (undecodable) gets NaN."""
    a = np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.1, 0.12, 0.5, 0.52]])
    b = [0.6, 0.6, 0.9, 0.9]
    one = _rows((a[0], 0.15), (a[1], 0.15), (b, 0.35))
    other = _rows((a[2], 0.1), ([np.nan] * 4, np.nan))  # a position the image lacks
    np.testing.assert_allclose(localise_eval.guesses([one], 0.5)[0, 0], b)
    union = localise_eval.guesses([one, other], 0.5)
    np.testing.assert_allclose(union[0, 0], a.mean(0), rtol=1e-6)
    assert np.isnan(union[0, 1:]).all()  # the other slots had no boxes
    rows = np.full((2, 2, localise_eval.TOP, 5), np.nan, np.float32)
    for j in range(localise_eval.TOP):  # slot j: one box at x0 = j / 10, and one past the edge
        rows[0, 0, j] = [j / 10, 0.2, 0.5, 0.6, 0.1]
        rows[0, 1, j] = [0.6, -0.2, 1.3, 0.4, 0.03 + j / 40]  # 0.105 from slot 3
    found = localise_eval.guesses([rows.reshape(2, -1)], 0.5)
    np.testing.assert_allclose(found[0, :3, 0], [0, 0.1, 0.2])  # slots 0–2: the first box
    np.testing.assert_allclose(found[0, 3:], [[0.6, 0, 1, 0.4]] * 2)  # 3–4: the second, cut
    assert np.isnan(found[1]).all()


def test_protocol_2_finds_the_box_its_classifier_sees_and_misses_under_a_wrong_class_or_position():
    """Known answer: an SCR map whose two top-left windows see object X (both give X) and whose
    ten others give box Y; the classifier sees class 3 (0.9) in those two windows only (0.02
    elsewhere). X's rating, 2 × 0.9, beats Y's ten 0.02s: the guess for class 3 is X, the
    image is right. Rating with the class's map shifted one column, with another class's
    channel, or naming the classes in another order than their boxes: Y, or another class's
    guess, and the image is wrong."""
    x, y = np.array([8.0, 8, 88, 60]), np.array([100.0, 70, 150, 120])
    seen = {(0, 0), (0, 1)}
    loc_map = np.zeros((1, 3, 4, 4))
    posterior = np.zeros((1, 3, 4, 6))
    for i, j in WINDOWS:
        box = (x if (i, j) in seen else y) - [32 * j, 32 * i] * 2
        loc_map[0, i, j] = localise.encode(box, 64)
        p = 0.9 if (i, j) in seen else 0.02
        posterior[0, i, j] = (1 - p) / 5
        posterior[0, i, j, 3] = p
    logits, classes, truth = np.log(posterior), [3, 0, 1, 2, 4], [x[None] / PX]

    def error(cls_logits, named=classes):
        rows = _protocol2(loc_map, cls_logits, classes).reshape(1, -1)
        found = localise_eval.guesses([rows], 0.5)
        return localise.top5_error(np.array([named]), found, np.array([3]), truth, [False])

    np.testing.assert_allclose(
        localise_eval.guesses([_protocol2(loc_map, logits, classes).reshape(1, -1)], 0.5)[0, 0],
        x / PX,
        rtol=1e-5,
    )
    assert error(logits) == 0.0
    assert error(np.roll(logits, 1, axis=2)) == 1.0  # a wrong position
    assert error(logits[..., [0, 1, 2, 4, 3, 5]]) == 1.0  # class 3's posterior is another's
    assert error(logits, named=[0, 3, 1, 2, 4]) == 1.0  # the classes in another order


def test_mistakes_name_the_field(tmp_path):
    _, config = load_config("configs/demo_loc.py")
    (tmp_path / pretrained.CONFIG_FILE).write_text(json.dumps(dict(model="A", mean_rgb=[0, 0, 0])))
    with pytest.raises(boxes.UserError, match="is a classification net"):
        localise_eval.nets(config, str(tmp_path))
    with pytest.raises(boxes.UserError, match="config.loc.classifier must name"):
        localise_eval.classifier_config(config)  # neither it nor init_from is given
    config.loc.classifier = str(tmp_path)
    assert localise_eval.classifier_config(config)[1].eval.protocols == ("multi_scale_dense",)


KNOWN_TOP5 = [7, 2, 9, 0, 4]  # the end-to-end test's classifier's top-5 classes, in order


def _known_classifier(path):
    """A narrow untrained demo classifier saved at `path` whose fc8 (kernel 0) gives its bias
    at every position of every image: the top-5 classes are KNOWN_TOP5. Returns the bias."""
    variables = init(narrow("vgg11_bn"))
    bias = np.zeros(10, np.float32)
    bias[KNOWN_TOP5] = [2.5, 2.0, 1.5, 1.0, 0.5]
    kernel = jnp.zeros_like(variables["params"]["fc8"]["kernel"])
    variables["params"]["fc8"] = dict(kernel=kernel, bias=jnp.asarray(bias))
    checkpoints.save_params(str(path), variables)
    net = dict(
        model="vgg11_bn",
        width=1 / 16,
        fc_width=32,
        crop_size=64,
        num_classes=10,
        kernel_init="he",
        mean_rgb=[126.653, 128.350, 128.137],
    )
    (path / pretrained.CONFIG_FILE).write_text(json.dumps(net))
    return bias


def _pixel_iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return w * h / (area(a) + area(b) - w * h)


def _top5_error_of(found, data_dir):
    """The ILSVRC criterion from a run's boxes.npz, the folder names and boxes.json (one box
    an image), computed apart from vggjax: right when a guess has the label's class and IoU
    above 0.5 with the image's box."""
    with open(os.path.join(data_dir, "boxes.json")) as f:
        truth = json.load(f)
    names = sorted(os.listdir(os.path.join(data_dir, "val")))
    right = [
        any(
            c == names.index(image_id.split("/")[0])
            and _pixel_iou(g, truth[f"val/{image_id}"]) > 0.5
            for c, g in zip(classes, guesses)
        )
        for image_id, classes, guesses in zip(found["ids"], found["classes"], found["boxes"])
    ]
    return 1 - np.mean(right)


def test_training_a_localisation_net_needs_a_classifier_or_random_weights_by_name(tmp_path):
    """Sect. A.1 starts a localisation net from a classification run: without init_from,
    training stops with one line (exit 2) unless loc.from_scratch asks for random weights;
    testing needs neither."""
    _, config = load_config("configs/vgg16_loc.py")
    with pytest.raises(UserError, match="config.init_from is empty.*from_scratch=True"):
        options.check_start(config)
    config.loc.from_scratch = True
    options.check_start(config)
    config.init_from = "runs/vgg16"
    with pytest.raises(UserError, match="give one of them"):
        options.check_start(config)
    config.loc.from_scratch = False
    options.check_start(config)
    options.check_start(load_config("configs/demo.py")[1])  # classification: no classifier
    result = run_main("--config=configs/vgg16_loc.py", f"--workdir={tmp_path}", XLA_FLAGS="")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "config.init_from is empty, but a localisation net (objective pcr)" in lines[0]


def _loss_at(log, step):
    return float(re.search(rf"step {step}/\d+ .*?\| loss ([\d.]+)", log).group(1))


def test_demo_trains_and_tests_both_protocols_through_the_command_line(tiny_demo_dir, tmp_path):
    """configs/demo_loc.py from a (narrow, untrained) demo classifier: the loss falls, both
    protocols run, and the fusion of a net with itself is the net (their union merges alike).
    The classifier's answer is known: its fc8 gives its bias everywhere, so every image's top-5
    classes are KNOWN_TOP5, the written posteriors softmax(bias)'s, and the images of the other
    five classes (half) are errors; the top-5 error is recomputed here from the written guesses
    and boxes.json."""
    classifier = tmp_path / "C"
    bias = _known_classifier(classifier)
    common = [
        "--config=configs/demo_loc.py",
        f"--workdir={tmp_path / 'L'}",
        f"--config.init_from={classifier}",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.batch_size=16",
        "--config.eval.batch_size=16",
        "--config.num_workers=0",
        "--config.eval.scales=(88,)",
    ]
    env = dict(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    trained = run_main(
        *common,
        "--config.num_train_steps=30",
        "--config.log_every_steps=10",
        **env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert _loss_at(trained.stderr, 30) < 0.7 * _loss_at(trained.stderr, 10)
    tested = run_main(
        *common,
        "--mode=eval",
        f"--config.loc.checkpoints=('{tmp_path / 'L'}', '{tmp_path / 'L'}')",
        **env,
    )
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "GT class localisation error (%)" in tested.stdout and "fusion" in tested.stdout
    results = json.loads((tmp_path / "L" / "localisation_results.json").read_text())
    assert results["images"] == 40
    gt = [r for r in results["results"] if r["protocol"] == "gt_class"]
    top5 = [r for r in results["results"] if r["protocol"] == "top5"]
    assert len(gt) == 2 and len(top5) == 3 and 0 <= gt[0]["gt_class_error"] <= 1
    assert gt[0]["gt_class_error"] == gt[1]["gt_class_error"]
    assert top5[0]["top5_error"] == top5[1]["top5_error"] == top5[2]["top5_error"]
    found = np.load(tmp_path / "L" / "boxes.npz")
    assert found["boxes"].shape == (40, 5, 4) and found["classes"].shape == (40, 5)
    np.testing.assert_array_equal(found["classes"], np.tile(KNOWN_TOP5, (40, 1)))
    posterior = np.exp(bias) / np.exp(bias).sum()
    np.testing.assert_allclose(found["scores"], np.tile(posterior[KNOWN_TOP5], (40, 1)), rtol=1e-5)
    assert top5[0]["top5_error"] == pytest.approx(_top5_error_of(found, tiny_demo_dir))
    assert top5[0]["top5_error"] >= 0.5  # the 20 images of the classes not guessed
    for image_id, guess in zip(found["ids"], found["boxes"]):
        w, h = Image.open(os.path.join(tiny_demo_dir, "val", image_id)).size
        assert (guess >= 0).all() and (guess[:, 2] <= w).all() and (guess[:, 3] <= h).all()
