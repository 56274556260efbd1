"""Tests for the demo set, the sources and the grain pipelines."""

import json
import logging
import os
import threading

import ml_collections
import numpy as np
import pytest
from absl import flags
from PIL import Image

from vggjax.data import arrays, augment, demo, pipeline, sources
from vggjax.errors import UserError

N_TRAIN, N_VAL = 24, 10  # The indexed set: image i has the colour (i, 0, 0).


# Demo set.


def test_demo_layout_and_boxes(demo_dir):
    assert sorted(os.listdir(demo_dir)) == ["boxes.json", "train", "val"]
    with open(os.path.join(demo_dir, "boxes.json")) as f:
        boxes = json.load(f)
    files = []
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(os.listdir(os.path.join(demo_dir, split))) == sorted(demo.CLASSES)
        for name in demo.CLASSES:
            names = sorted(os.listdir(os.path.join(demo_dir, split, name)))
            assert len(names) == count
            files += [f"{split}/{name}/{n}" for n in names]
    assert sorted(boxes) == sorted(files)
    sizes = set()
    for relpath, (x0, y0, x1, y1) in boxes.items():
        with Image.open(os.path.join(demo_dir, relpath)) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            w, h = image.size
        sizes.add((w, h))
        assert min(w, h) >= 64 and max(w, h) <= 160
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # Large enough to survive a 64 px crop of a 64-96 px rescale.
        assert max(x1 - x0, y1 - y0) >= 0.4 * min(w, h)
    assert len(sizes) > 20


def test_demo_is_deterministic(demo_dir, tmp_path):
    other = demo.ensure_demo_dataset(str(tmp_path / "again"), train_per_class=1, val_per_class=1)
    for relpath in ("train/circle/0000.jpg", "train/star/0000.jpg", "val/crescent/0000.jpg"):
        with (
            open(os.path.join(demo_dir, relpath), "rb") as a,
            open(os.path.join(other, relpath), "rb") as b,
        ):
            assert a.read() == b.read()


def test_demo_reuses_an_existing_set(demo_dir):
    boxes = os.path.join(demo_dir, "boxes.json")
    before = os.stat(boxes).st_mtime_ns
    assert demo.ensure_demo_dataset(demo_dir) == demo_dir
    assert os.stat(boxes).st_mtime_ns == before


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("not a demo set")
    with pytest.raises(ValueError, match="holds no demo data set"):
        demo.ensure_demo_dataset(str(tmp_path))


def test_demo_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def killed(root, counts):
        os.makedirs(os.path.join(root, "train"))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_generate", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(str(tmp_path / "demo"))
    assert os.listdir(tmp_path) == []


def test_demo_concurrent_callers_share_one_complete_set(tmp_path):
    root, results = str(tmp_path / "demo"), []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                demo.ensure_demo_dataset(root, train_per_class=2, val_per_class=1)
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [root] * 3
    assert os.listdir(tmp_path) == ["demo"]  # No temporary directories left.
    assert len(sources.FolderSource(os.path.join(root, "train"))) == 20


def test_demo_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VGGJAX_CACHE", str(tmp_path))
    assert demo.default_root() == os.path.join(str(tmp_path), "demo-v1")


# Sources.


def test_folder_source(indexed_dir):
    source = sources.make_source(_config(indexed_dir), "train")
    assert len(source) == N_TRAIN and source.num_classes == 3
    assert source.class_names == ("class0", "class1", "class2")
    first = source[0]
    assert first["id"] == "class0/000.png" and first["label"] == 0
    assert first["data"].startswith(b"\x89PNG")
    assert source[len(source) - 1]["id"] == "class2/023.png"


def test_demo_source(demo_dir):
    source = sources.make_source(_config(demo_dir, dataset="demo"), "val")
    assert len(source) == 20 and source.class_names == tuple(sorted(demo.CLASSES))


@pytest.mark.parametrize(
    "layout, match",
    [
        (None, "is not a directory"),
        ("train", r"val is not a directory: expected .*/val/<class>/"),
        ("val/empty_class", "holds no image files"),
    ],
)
def test_bad_folders_raise_clear_errors(tmp_path, layout, match):
    data_dir = tmp_path / "data"
    if layout:
        (data_dir / layout).mkdir(parents=True)
    with pytest.raises(ValueError, match=match) as e:
        sources.make_source(_config(str(data_dir)), "val")
    assert str(data_dir) in str(e.value) and "\n" not in str(e.value)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        sources.make_source(_config("/tmp", dataset="mnist"), "train")
    with pytest.raises(ValueError, match="split"):
        sources.make_source(_config("/tmp"), "test")


def test_unprepared_imagenet_says_how_to_prepare(tmp_path):
    config = _config(str(tmp_path), dataset="imagenet2012")
    with pytest.raises(ValueError, match="tfds build imagenet2012"):
        sources.make_source(config, "train")


# Training pipeline.


def test_train_batches_have_documented_shapes(demo_dir):
    config = _config(
        demo_dir,
        dataset="demo",
        batch_size=6,
        crop_size=64,
        train_scale=(64, 96),
        mean_rgb=(127.0, 127.0, 127.0),
        colour_shift_std=0.1,
    )
    batches = _take(config, 2)
    for batch in batches:
        assert batch["image"].shape == (6, 64, 64, 3)
        assert batch["image"].dtype == np.uint8
        assert batch["shift"].shape == (6, 3) and batch["shift"].dtype == np.float32
        assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == np.float32
        assert (batch["mask"] == 1).all()
        assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
        net_input = augment.net_input(batch)
        assert net_input.dtype == np.float32
        assert net_input.min() > -160 and net_input.max() < 160
    assert _same(batches, _take(config, 2))
    assert not _same(batches, _take(config, 2, seed=1))


def test_train_shifts_are_colour_shifts_minus_the_mean(demo_dir):
    """Each image's shift, drawn with its crop's rng, is a PCA colour shift minus the mean RGB:
    in the eigenbasis, alpha * eigval * 255 with alpha ~ N(0, 0.1), a new one per image."""
    mean = (120.0, 110.0, 100.0)
    config = _config(
        demo_dir,
        dataset="demo",
        batch_size=10,
        crop_size=32,
        train_scale=(32, 48),
        mean_rgb=mean,
        colour_shift_std=0.1,
    )
    shifts = np.concatenate([b["shift"] for b in _take(config, 6)])
    alphas = (shifts + mean) @ augment.IMAGENET_EIGVEC / (augment.IMAGENET_EIGVAL * 255)
    assert len(np.unique(alphas[:, 0])) == 60
    assert np.abs(alphas).max() < 0.45  # 4.5 sd
    np.testing.assert_allclose(alphas.std(0), 0.1, rtol=0.35)  # 60 draws: sd of the sd ~ 9%
    config.colour_shift_std = 0.0
    np.testing.assert_allclose(_take(config, 1)[0]["shift"], -np.float32([mean] * 10))


def test_train_epochs_cover_the_set_and_reshuffle(indexed_dir):
    steps = N_TRAIN // 4
    ids = [_ids(b) for b in _take(_config(indexed_dir), 2 * steps)]
    first, second = sum(ids[:steps], []), sum(ids[steps:], [])
    assert sorted(first) == sorted(second) == list(range(N_TRAIN))
    assert first != second and first != sorted(first)


def test_train_labels_match_images(indexed_dir):
    for batch in _take(_config(indexed_dir), 3):
        assert [i % 3 for i in _ids(batch)] == batch["label"].tolist()


def _shards(config, steps: int) -> list[list[dict[str, np.ndarray]]]:
    return [_take(config, steps, process_index=p, process_count=2) for p in range(2)]


def test_process_shards_are_disjoint_and_cover_each_epoch(indexed_dir):
    config = _config(indexed_dir)
    steps = N_TRAIN // 4
    seen = [sum((_ids(b) for b in shard), []) for shard in _shards(config, steps)]
    assert len(seen[0]) == len(seen[1]) == N_TRAIN // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train_dataset(config, process_index=0, process_count=3)


def test_process_shards_interleave_the_single_process_batches(demo_dir):
    # Augmentation included: global batches do not depend on process count.
    config = _config(
        demo_dir, dataset="demo", crop_size=32, train_scale=(32, 48), colour_shift_std=0.1
    )
    shards, single = _shards(config, 2), _take(config, 2)
    for t in range(2):
        assert shards[0][t]["image"].shape == (2, 32, 32, 3)
        for p in range(2):
            for k in ("image", "shift", "label", "mask"):
                np.testing.assert_array_equal(shards[p][t][k], single[t][k][p::2])


def test_resume_from_state_continues_exactly(demo_dir):
    config = _config(
        demo_dir, dataset="demo", crop_size=32, train_scale=(32, 48), colour_shift_std=0.1
    )
    it = iter(pipeline.train_dataset(config))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # As checkpoints store it.
    expected = [next(it) for _ in range(4)]
    resumed = iter(pipeline.train_dataset(config))
    resumed.set_state(state)
    assert _same([next(resumed) for _ in range(4)], expected)


def test_bad_files_are_masked_and_logged_once(demo_dir, tmp_path, caplog):
    data_dir = tmp_path / "data"
    _write_indexed(data_dir, "train", 9)
    broken = data_dir / "train" / "zz_broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "notes.txt").write_text("not an image")
    with open(os.path.join(demo_dir, "train", "ring", "0000.jpg"), "rb") as f:
        jpeg = f.read()
    (broken / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    config = _config(str(data_dir))
    with caplog.at_level(logging.WARNING):
        batches = _take(config, 6)  # Two epochs of 12 images.
    labels = np.concatenate([b["label"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(masks, (labels != 3).astype(np.float32))
    assert (labels == 3).sum() == 6 and not images[labels == 3].any()
    warnings = [r.getMessage() for r in caplog.records if "zz_broken" in r.getMessage()]
    assert len(warnings) == 3 and all("Masking out" in w for w in warnings)


def test_scale_smaller_than_crop_is_rejected(indexed_dir):
    with pytest.raises(ValueError, match="train_scale"):
        pipeline.train_dataset(_config(indexed_dir, train_scale=(3, 6)))
    with pytest.raises(ValueError, match="eval_scale"):
        pipeline.eval_dataset(_config(indexed_dir, eval_scale=3))


# Images held in memory (config.data_in_memory).


def _write_noise(root, split: str, n: int, size=(12, 10)) -> None:
    """n noise PNGs of one size in 3 classes, and one file that is not an image."""
    rng = np.random.default_rng(len(split))
    for i in range(n):
        folder = root / split / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (root / split / "class1" / "broken.png").write_bytes(b"not a png")


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("noise")
    _write_noise(root, "train", 11)
    _write_noise(root, "val", 5)
    return str(root)


def _augmenting(data_dir: str, tmp_path, **overrides) -> ml_collections.ConfigDict:
    """Scale jittering (rescales up and down), padding, flips and colour shifts, in memory."""
    augmenting = dict(
        crop_size=8,
        train_scale=(9, 14),
        crop_padding=2,
        random_flip=True,
        colour_shift_std=0.1,
        mean_rgb=(100.0, 110.0, 120.0),
        data_in_memory=True,
        data_cache_dir=str(tmp_path / "cache"),
    )
    return _config(data_dir, **(augmenting | overrides))


@pytest.mark.parametrize(
    "process_index,process_count,fixed",
    [(0, 1, False), (1, 2, False), (0, 1, True)],
)
def test_in_memory_batches_are_the_folder_batches(
    noise_dir, tmp_path, process_index, process_count, fixed
):
    """The same seed gives the same batches, augmentation and bad-image masks included; with a
    fixed S (the split rescaled once) and no colour shift (not drawn) too."""
    fixing = dict(train_scale=(12, 12), colour_shift_std=0.0) if fixed else {}
    config = _augmenting(noise_dir, tmp_path, **fixing)
    shard = dict(process_index=process_index, process_count=process_count)
    in_memory = _take(config, 7, **shard)  # two and a half epochs of 12
    config.data_in_memory = False
    from_files = _take(config, 7, **shard)
    assert _same(in_memory, from_files) and set(in_memory[0]) == set(from_files[0])
    masks = np.concatenate([b["mask"] for b in in_memory])
    assert 0 < (masks == 0).sum() < len(masks)


def test_in_memory_resumes_exactly(noise_dir, tmp_path):
    config = _augmenting(noise_dir, tmp_path)
    it = iter(pipeline.train_dataset(config))
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = iter(pipeline.train_dataset(config))
    resumed.set_state(state)
    assert _same([next(resumed) for _ in range(3)], expected)


def test_in_memory_eval_is_the_folder_eval(noise_dir, tmp_path):
    config = _augmenting(noise_dir, tmp_path, eval_scale=9)
    in_memory = list(pipeline.eval_dataset(config))
    config.data_in_memory = False
    assert _same(in_memory, list(pipeline.eval_dataset(config))) and len(in_memory) == 2


def test_in_memory_cache_is_reread_when_the_folder_changes(tmp_path):
    _write_noise(tmp_path / "data", "train", 4)
    config = _augmenting(str(tmp_path / "data"), tmp_path)
    first = arrays.array_source(config, "train")
    assert arrays.array_source(config, "train").path == first.path  # decoded once
    assert [e["id"] for e in map(first.__getitem__, range(5))] == [
        "class0/000.png",
        "class0/003.png",
        "class1/001.png",
        "class1/broken.png",
        "class2/002.png",
    ]
    changed = np.full((12, 10, 3), 7, np.uint8)
    Image.fromarray(changed).save(tmp_path / "data" / "train" / "class0" / "003.png")
    os.utime(tmp_path / "data" / "train" / "class0" / "003.png", ns=(1, 1))
    again = arrays.array_source(config, "train")
    assert again.path != first.path
    np.testing.assert_array_equal(again[1]["data"], changed)
    assert again[3]["data"] == b"" and again[3]["label"] == 1  # masked by the pipelines


def test_in_memory_needs_images_of_one_size(indexed_dir, tmp_path):
    with pytest.raises(UserError, match="images of one size"):
        arrays.array_source(_augmenting(indexed_dir, tmp_path), "train")


# Evaluation pipeline.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_image_once(indexed_dir, process_count):
    config = _config(indexed_dir)
    per_process = [
        list(pipeline.eval_dataset(config, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert {len(batches) for batches in per_process} == {3}  # ceil(10 / 4).
    ids, masks = [], []
    for batches in per_process:
        for batch in batches:
            assert set(batch) == {"image", "shift", "label", "mask"}
            assert batch["image"].shape == (4 // process_count, 4, 4, 3)
            assert batch["image"].dtype == np.uint8
            np.testing.assert_array_equal(batch["shift"], 0)  # minus the mean, (0, 0, 0) here
            ids += _ids(batch)
            masks += batch["mask"].tolist()
            assert [i % 3 for i in _ids(batch)] == batch["label"][batch["mask"] == 1].tolist()
    assert sorted(ids) == list(range(N_VAL))
    assert sorted(masks) == [0.0] * 2 + [1.0] * N_VAL


def test_steps_per_epoch():
    assert pipeline.steps_per_epoch(_config("/tmp", batch_size=4), 10) == 3
    assert pipeline.steps_per_epoch(_config("/tmp", batch_size=5), 10) == 2


# Worker processes.


def test_workers_give_the_same_batches_and_resume(demo_dir):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads its absl flags for workers.
    config = _config(
        demo_dir, dataset="demo", crop_size=32, train_scale=(32, 48), colour_shift_std=0.1
    )
    expected = _take(config, 6)
    config.num_workers = 2
    it = iter(pipeline.train_dataset(config))
    try:
        assert _same([next(it) for _ in range(3)], expected[:3])
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed = iter(pipeline.train_dataset(config))
    try:
        resumed.set_state(state)
        assert _same([next(resumed) for _ in range(3)], expected[3:])
    finally:
        resumed.close()


# Helpers ---------------------------------------------------------------------------------------


def _config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            dataset="folder",
            data_dir=data_dir,
            batch_size=4,
            crop_size=4,
            train_scale=(4, 6),
            eval_scale=5,
            mean_rgb=(0.0, 0.0, 0.0),
            colour_shift_std=0.0,
            seed=0,
            num_workers=0,
        )
    )
    config.update(overrides)
    return config


def _write_indexed(root, split: str, n: int) -> None:
    """n small PNGs in 3 classes; pixel values name the image, so batches can
    be traced back to source images (no colour shift, zero mean)."""
    for i in range(n):
        folder = root / split / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (8 + i % 4, 7 + i % 5)  # Varied sizes and aspect ratios.
        Image.new("RGB", size, (i, 0, 0)).save(folder / f"{i:03d}.png")


def _ids(batch: dict[str, np.ndarray]) -> list[int]:
    """Source indices of a batch's real (mask 1) images."""
    return [
        int(round(image[..., 0].mean())) for image, m in zip(batch["image"], batch["mask"]) if m
    ]


@pytest.fixture(scope="module")
def indexed_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("indexed")
    _write_indexed(root, "train", N_TRAIN)
    _write_indexed(root, "val", N_VAL)
    return str(root)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    return demo.ensure_demo_dataset(
        str(tmp_path_factory.mktemp("cache") / "demo"), train_per_class=3, val_per_class=2
    )


def _take(config, n: int, **kwargs) -> list[dict[str, np.ndarray]]:
    it = iter(pipeline.train_dataset(config, **kwargs))
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
