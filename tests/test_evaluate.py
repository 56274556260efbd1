"""Testing protocols (Sect. 3.2, 4.1–4.4): padded dense = alone, flips, crops, scales, fusion."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_main
from jax._src import monitoring

from vggjax import checkpoints, evaluators, models, options, recipe, sharding, train
from vggjax.data import augment
from vggjax.engine import Engine, buckets, programs, scheduler
from vggjax.errors import UserError
from vggjax.evaluators import classification

CROP = 64
# Several aspect ratios, odd and even sides (odd ones exercise the floor of every pooling).
SHAPES = [(64, 64), (67, 101), (99, 73), (64, 150), (127, 95), (80, 80)]


@pytest.mark.parametrize("name", ["A", "vgg11_bn"])
def test_padded_dense_evaluation_equals_each_image_alone(name):
    model, variables = narrow(name)
    images = random_images(SHAPES)
    batch, sizes = padded_batch(images)
    scores = jax.jit(lambda v, x, s: buckets.dense_average(model, v, x, s))(variables, batch, sizes)
    unmasked = jax.jit(lambda v, x: model.apply(v, x, dense=True))(variables, batch)
    for i, image in enumerate(images):
        alone = model.apply(variables, image[None], dense=True)[0]
        alone_mean = alone.mean((0, 1))
        rel = float(jnp.abs(scores[i] - alone_mean).max() / jnp.abs(alone_mean).max())
        assert rel < 1e-4, (SHAPES[i], rel)
        # Without the masks the padding leaks in: the same positions of the unmasked map differ.
        h, w = alone.shape[:2]
        leak = float(jnp.abs(unmasked[i, :h, :w] - alone).max() / jnp.abs(alone).max())
        assert leak > 1e-3, (SHAPES[i], leak)


@pytest.mark.parametrize("alignment", ["centred", "grid"])
def test_aligned_dense_evaluation_equals_each_image_alone_shifted(net_a, alignment):
    """Pooling floors each map: the windows of a side cover crop + 32k pixels, and the rest
    (size % 32 here) goes unseen. Centred, an image's map is that of the image less half that
    margin at the top and left; the grid averages the maps of 3×3 shifts spanning it. Batched
    and padded, as each image alone."""
    model, variables = net_a
    shapes = SHAPES if alignment == "centred" else [SHAPES[1], SHAPES[4]]
    images = random_images(shapes, seed=5)
    batch, sizes = padded_batch(images)
    margins = buckets.unseen_margins(sizes, CROP)
    np.testing.assert_array_equal(margins, np.asarray(shapes) % 32)
    offsets = np.asarray(buckets.alignment_offsets(sizes, CROP, alignment))  # (shifts, N, 2)
    # (67, 101): margins (3, 5), split (1, 2) | (2, 3); the grid at 0, 1/2 and all of each.
    expected = dict(centred=[[1, 2]], grid=[[y, x] for y in (0, 1, 3) for x in (0, 2, 5)])
    assert offsets[:, shapes.index((67, 101))].tolist() == expected[alignment]
    average = functools.partial(buckets.aligned_average, model, alignment=alignment)
    got = jax.jit(average)(variables, batch, sizes)
    top_left = jax.jit(functools.partial(buckets.dense_average, model))(variables, batch, sizes)
    for i, image in enumerate(images):
        maps = [
            model.apply(variables, image[None, y:, x:], dense=True)[0] for y, x in offsets[:, i]
        ]
        alone = jnp.concatenate([m.reshape(-1, m.shape[-1]) for m in maps]).mean(0)
        rel = float(jnp.abs(got[i] - alone).max() / jnp.abs(alone).max())
        assert rel < 1e-4, (shapes[i], rel)
        moved = float(jnp.abs(got[i] - top_left[i]).max() / jnp.abs(alone).max())
        assert (moved > 1e-3) == bool(margins[i].any()), (shapes[i], moved)


def test_mirrored_image_gets_the_same_flip_averaged_posteriors(net_a):
    model, variables = net_a
    image = random_images([(75, 110)], seed=1)[0]
    batch, sizes = padded_batch([image, image[:, ::-1]])
    mirrored = buckets.mirror(jnp.asarray(batch), sizes)
    np.testing.assert_array_equal(mirrored[0, :75, :110], image[:, ::-1])
    np.testing.assert_array_equal(mirrored[1, :75, :110], image)
    both = classification.dense_posteriors(model, variables, batch, sizes, flip=True)
    np.testing.assert_allclose(both[0], both[1], rtol=0, atol=1e-6)
    one = classification.dense_posteriors(model, variables, batch, sizes, flip=False)
    assert float(jnp.abs(one[0] - one[1]).max()) > 1e-3  # the net itself is not mirror-invariant
    np.testing.assert_allclose(both[0], (one[0] + one[1]) / 2, rtol=0, atol=1e-6)


def classic(model, variables, crops):
    return jax.nn.softmax(model.apply(variables, jnp.asarray(crops)))


def test_multi_crop_is_a_5x5_grid_times_2_flips(net_a):
    model, variables = net_a
    # The offsets span 0 … H − crop.
    assert classification.grid_offsets(100, CROP).tolist() == [0, 9, 18, 27, 36]
    image = random_images([(100, 130)], seed=2)[0]
    batch, sizes = padded_batch([image])
    ys, xs = (classification.grid_offsets(n, CROP).tolist() for n in image.shape[:2])
    crops = [image[y : y + CROP, x : x + CROP] for y in ys for x in xs]
    assert len({(y, x) for y in ys for x in xs}) == 25
    crops = np.stack(crops + [c[:, ::-1] for c in crops])  # 50 crops
    expected = classic(model, variables, crops).mean(0)
    got = classification.multi_crop_posteriors(model, variables, batch, sizes)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # One crop alone (the 25 are different) gives something else.
    assert float(jnp.abs(classic(model, variables, crops[:1])[0] - expected).max()) > 1e-3
    centre = classification.centre_crop_posteriors(model, variables, batch, sizes)[0]
    expected = classic(model, variables, augment.center_crop(image, CROP)[None])[0]
    np.testing.assert_allclose(centre, expected, rtol=0, atol=1e-6)


def test_at_crop_size_multi_crop_dense_and_classic_agree(net_a):
    """A crop-sized image: all 25 crops are the image, and the dense net is the classic one."""
    model, variables = net_a
    image = random_images([(CROP, CROP)], seed=3)[0]
    batch, sizes = padded_batch([image], (96, 128))
    flip_averaged = classic(model, variables, np.stack([image, image[:, ::-1]])).mean(0)
    for got in (
        classification.multi_crop_posteriors(model, variables, batch, sizes)[0],
        classification.dense_posteriors(model, variables, batch, sizes, flip=True)[0],
    ):
        np.testing.assert_allclose(got, flip_averaged, rtol=0, atol=1e-5)


def test_engine_shrinks_small_batches_and_equals_each_image_alone(net_a, monkeypatch, caplog):
    """Scales with the same heads share batches; a bucket that fills a batch runs its rest in
    a full one, the others in the smallest batch holding them (on 2 devices: 2, 4 or 8). Dense
    top-left and centred (each image shifted by its own margins) alike."""
    model, variables = net_a
    mean = (120.0, 110.0, 100.0)
    heads = {
        a: classification.posterior_heads(alignment=a)["dense"] for a in ("top_left", "centred")
    }
    engine = Engine(
        model,
        mean,
        sharding.make_mesh(jax.devices()[:2]),
        dict.fromkeys((72, 88), tuple(heads)),
        heads,
        global_batch=8,
    )
    assert engine.batch_sizes[-3:] == (2, 4, 8)  # (1, 2, 4, 8) on a single device
    # Buckets: (96, 128) holds 5 + 5 images of both Q; (96, 96), (128, 96), (96, 160): 2 each.
    sizes = {72: [(72, 100)] * 5 + [(72, 72), (100, 72), (72, 150)], 88: [(88, 120)] * 5}
    sizes[88] += [(88, 88), (120, 88), (88, 150)]
    rng = np.random.default_rng(4)
    elements = [
        dict(
            index=k,
            id=str(k),
            label=0,
            images=[rng.integers(0, 256, (*sizes[q][k], 3), np.uint8) for q in (72, 88)],
        )
        for k in range(8)
    ]
    monkeypatch.setattr(scheduler, "_LOG_EVERY_SECONDS", 0)  # a progress line at every step
    with caplog.at_level("INFO"):
        out = engine.outputs(variables, elements, 8, "test")
    # At the end three tails need new programs, two or more unbuilt: the progress line says so.
    assert re.search(r"Evaluating test: 8/8 images read; compiling [2-4] programs", caplog.text)
    # Batches: 8 + 8 slots for (96, 128)'s 10 images, then 2 slots for each other bucket.
    assert out["batches"] == 5 and len(engine.programs) == 4
    assert out["padded_pixels"] == 96 * (16 * 128 + 2 * (96 + 128 + 160))
    cost = engine.cost()
    assert cost["compiled_shapes"] + cost["cached_shapes"] == 4 and cost["compile_seconds"] > 0
    # The cache-hit counter listens from the first program built, once per process.
    assert monitoring.get_event_listeners().count(programs._count_cache_hits) == 1
    for i, q in enumerate((72, 88)):
        for k, element in enumerate(elements):
            x = augment.subtract_mean(element["images"][i], mean)[None]
            sizes = jnp.asarray([x.shape[1:3]])
            for a in heads:
                alone = classification.dense_posteriors(model, variables, x, sizes, alignment=a)
                # Rounding differs with the batch: measured 15 of 16 within 1.2e-7 relative and
                # one at 2.7e-4 (a posterior of 0.055, on an AVX2 host; 1e-4 held on AVX-512).
                np.testing.assert_allclose(out["raw"][a, q][k], alone[0], rtol=1e-3, atol=1e-6)


def test_a_batch_that_does_not_split_is_named_by_the_code_that_reads_it(net_a):
    """The engine says what does not split; `from_config`, which reads the config, names it."""
    mesh = sharding.make_mesh(jax.devices()[:2])
    heads = classification.posterior_heads()
    with pytest.raises(UserError, match=r"^the global batch \(3\) must split evenly over 1 "):
        Engine(net_a[0], (0.0, 0.0, 0.0), mesh, {72: ("dense",)}, heads, global_batch=3)
    c = protocols_config()
    c.eval.batch_size = 3
    with pytest.raises(UserError, match=r"^config.eval.batch_size: the global batch \(3\)"):
        Engine.from_config(c, classification.plan(c), heads, mesh)


def test_modes_pick_evaluators_by_name():
    """`--mode=eval` tests a net as its objective asks; the other modes name their evaluator."""
    c = protocols_config()
    assert evaluators.for_mode("eval", c) == "classification"
    c.objective = "pcr"
    assert [evaluators.for_mode(m, c) for m in ("eval", "features")] == ["localisation", "features"]
    assert evaluators.get("classification") is classification.run
    with pytest.raises(UserError, match="no evaluator 'summary'"):
        evaluators.get("summary")


def test_importing_the_engine_registers_nothing_and_the_net_needs_no_box_maths():
    """Importing vggjax's evaluators changes nothing in JAX (the engine's cache-hit listener comes
    with its first program), and the net (models) loads no box code."""
    code = (
        "import sys; from jax._src import monitoring; before = monitoring.get_event_listeners()\n"
        "import vggjax.models\n"
        "assert not {'vggjax.localise', 'vggjax.objectives'} & set(sys.modules), 'box code'\n"
        "from vggjax import evaluators\n"
        "for name in evaluators.EVALUATORS: evaluators.get(name)\n"
        "assert monitoring.get_event_listeners() == before, 'a listener'\n"
    )
    env = dict(os.environ, PYTHONPATH=helpers.ROOT)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def protocols_config(protocols=tuple(options.EVAL_PROTOCOLS)[:-1], scales=(72, 88, 104)):
    c = recipe.paper_recipe("A", "72-104")
    c.crop_size, c.num_classes = CROP, 4
    c.eval.protocols, c.eval.scales = protocols, scales
    return c


def test_protocols_combine_scales_and_methods():
    c = protocols_config()
    plan = classification.plan(c)
    centre = classification.centre_crop_scale(CROP)
    assert centre == 73 and classification.centre_crop_scale(224) == 256
    assert plan == {
        72: ("dense", "multi_crop"),
        88: ("dense", "multi_crop"),
        104: ("dense", "multi_crop"),
        73: ("centre_crop",),
    }
    rng = np.random.default_rng(0)
    raw = {
        key: rng.dirichlet(np.ones(4), 3)
        for key in [(h, q) for q in (72, 88, 104) for h in ("dense", "multi_crop")]
        + [("centre_crop", 73)]
    }
    out = classification.protocol_posteriors(raw, c)
    assert set(out) == {
        "dense_q72",
        "dense_q88",
        "dense_q104",
        "multi_scale_dense",
        "multi_crop",
        "multi_crop_dense",
        "centre_crop",
    }
    dense = (raw["dense", 72] + raw["dense", 88] + raw["dense", 104]) / 3
    crops = (raw["multi_crop", 72] + raw["multi_crop", 88] + raw["multi_crop", 104]) / 3
    np.testing.assert_allclose(out["multi_scale_dense"], dense)
    np.testing.assert_allclose(out["multi_crop"], crops)
    np.testing.assert_allclose(out["multi_crop_dense"], (dense + crops) / 2)
    np.testing.assert_array_equal(out["dense_q88"], raw["dense", 88])
    np.testing.assert_array_equal(out["centre_crop"], raw["centre_crop", 73])
    assert classification.plan(protocols_config(("dense",))) == dict.fromkeys(
        (72, 88, 104), ("dense",)
    )


def test_fusion_averages_models_and_saved_predictions(tmp_path):
    labels = np.array([0, 1, 2, 3])
    bad = np.array([False, False, False, True])
    a = {"dense_q72": np.array([[0.6, 0.4, 0, 0], [0.6, 0.4, 0, 0], [0, 0, 1, 0], [0.25] * 4])}
    b = {
        "dense_q72": np.array([[0.2, 0.8, 0, 0], [0.1, 0.9, 0, 0], [0, 0.7, 0.3, 0], [0.25] * 4]),
        "multi_crop": np.ones((4, 4)) / 4,
    }
    fused = classification.fuse([a, b])
    assert list(fused) == ["dense_q72"]  # only what both models have
    np.testing.assert_allclose(fused["dense_q72"][0], [0.4, 0.6, 0, 0])
    # Model a alone: right on 0 and 2; b: right on 1; fused: right on 1 and 2. Image 3 is bad.
    assert classification.error_rates(a["dense_q72"], labels, bad)[0] == 0.5
    assert classification.error_rates(fused["dense_q72"], labels, bad)[0] == 0.5
    # An undecodable image is a top-5 error too.
    assert classification.error_rates(fused["dense_q72"], labels, bad)[1] == 0.25
    for name, posteriors in (("a", a), ("b", b)):
        np.savez(
            tmp_path / f"{name}.npz",
            ids=np.array(["w", "x", "y", "z"]),
            labels=labels,
            bad=bad,
            **{f"posteriors_{k}": v for k, v in posteriors.items()},
        )
    assert classification.fuse_predictions([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == {
        "dense_q72": (0.5, 0.25)
    }
    np.savez(tmp_path / "c.npz", ids=np.array(["w", "x", "z", "y"]), labels=labels, bad=bad)
    with pytest.raises(ValueError, match="other images"):
        classification.fuse_predictions([str(tmp_path / "a.npz"), str(tmp_path / "c.npz")])


def rescaled(h, w, q):
    """`augment.rescale_smallest_side`'s output size."""
    return (q, max(q, round(w * q / h))) if h <= w else (max(q, round(h * q / w)), q)


def bucket_count(scales, per_octave=8):
    """Buckets (and the most padding in one) of sizes 300–500 × 300–500 rescaled to `scales`."""
    shapes, waste = set(), 0.0
    for h in range(300, 501):
        for w in range(300, 501):
            for q in scales:
                size = rescaled(h, w, q)
                bucket = buckets.bucket_shape(*size, 32, per_octave)
                assert bucket[0] >= size[0] and bucket[1] >= size[1]
                assert bucket[0] % 32 == 0 and bucket[1] % 32 == 0
                shapes.add(bucket)
                waste = max(waste, 1 - size[0] * size[1] / (bucket[0] * bucket[1]))
    return len(shapes), waste


def test_bucket_shapes_stay_few_for_imagenet_like_sizes():
    """The README's bounds: 37 shapes at Q = 224, 256, 288; at 256, 384, 512 (coarser steps at
    large Q) 39, or 21 with 4 buckets per octave."""
    shapes, waste = bucket_count((224, 256, 288))
    assert shapes == 37 and waste < 0.13  # at most 12% of a bucket is padding
    shapes, waste = bucket_count((256, 384, 512))
    assert shapes == 39 and waste < 0.11
    shapes, waste = bucket_count((256, 384, 512), per_octave=4)
    assert shapes == 21 and waste < 0.2
    # However elongated, a few buckets per octave of aspect ratio: 8 per octave at Q = 256.
    long_sides = {buckets.bucket_shape(256, w)[1] for w in range(256, 256 * 8)}
    assert len(long_sides) == 3 * 8 + 1  # 256, 288, …, 512, 576, …, 1024, 1152, …, 2048
    assert buckets.bucket_shape(256, 600) == (256, 640)  # past 2Q, steps of 64


def test_eval_mode_end_to_end_with_an_undecodable_image(tiny_config, tiny_demo_dir, tmp_path):
    """Train 2 steps, then `--mode=eval` with every protocol, fusing two checkpoints."""
    workdir = tmp_path / "run"
    tiny_config.num_train_steps = 2
    train.train_and_evaluate(tiny_config, str(workdir))
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_demo_dir, "val"), data / "val")
    (data / "val" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    args = [
        "--config=configs/demo.py",
        "--mode=eval",
        f"--workdir={workdir}",
        "--config.dataset=folder",
        f"--config.data_dir={data}",
        "--config.width=0.0625",
        "--config.fc_width=32",
        "--config.num_classes=10",  # the folder holds val/ only
        "--config.num_workers=0",
        "--config.eval.batch_size=8",
    ]
    # A persistent compilation cache of its own, keeping every program: the rerun below loads.
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
    cache["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    result = run_main(
        *args,
        f"--config.eval.protocols={tuple(options.EVAL_PROTOCOLS)!r}",
        f"--config.eval.checkpoints=('{workdir}', '{workdir}/checkpoints/2')",
        **cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "circle/broken.jpg" in result.stderr and "images/s" in result.stderr
    assert "multi-crop & dense" in result.stdout and "top-5 val. error (%)" in result.stdout

    summary = json.loads((workdir / "eval_results.json").read_text())
    _check_rows(summary)
    predictions = np.load(workdir / "predictions.npz")
    ids = list(predictions["ids"])
    p = _check_predictions(predictions, ids)
    # One image through the whole pipeline equals the dense net applied to it alone.
    tiny_config.eval.scales = (88,)
    index = next(i for i, name in enumerate(ids) if not predictions["bad"][i])
    alone = _alone(tiny_config, str(workdir), data / "val" / ids[index], 88)
    np.testing.assert_allclose(p["dense_q88"][index], alone, atol=1e-5)

    # Bounded compilation: one program per (scale, bucket) the images fall in.
    expected = _programs(data / "val", [name for name in ids if name != "circle/broken.jpg"])
    assert summary["compiled_shapes"] == len(expected) <= 8 and summary["cached_shapes"] == 0
    assert summary["compile_seconds"] > 0 and "programs compiled" in result.stderr

    # A rerun needs the same programs (one checkpoint, the same heads): all from the cache.
    rerun = run_main(
        *args,
        f"--config.eval.protocols={tuple(options.EVAL_PROTOCOLS)[:-1]!r}",
        f"--config.eval.checkpoints=('{workdir}',)",
        **cache,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((workdir / "eval_results.json").read_text())
    assert (again["compiled_shapes"], again["cached_shapes"]) == (0, len(expected))


def test_centred_alignment_reaches_every_dense_protocol(tiny_config, tiny_demo_dir, tmp_path):
    """config.eval.dense_alignment=centred: the dense posteriors at each Q are of the centred
    map (one image's, by the net alone on the image less half its margins), and multi-scale
    dense and its fusion with multi-crop are made of them; eval_results.json names it."""
    c = tiny_config
    c.dataset, c.num_workers = "folder", 0
    c.eval.protocols = ("dense", "multi_scale_dense", "multi_crop", "multi_crop_dense")
    c.eval.scales, c.eval.dense_alignment = (72, 88), "centred"
    checkpoints.save_params(str(tmp_path), helpers.init(models.model_from_config(c)))
    summary = classification.run(c, str(tmp_path))
    assert summary["dense_alignment"] == "centred" and summary["images"] == 40
    p = np.load(tmp_path / "predictions.npz")
    dense = (p["posteriors_dense_q72"] + p["posteriors_dense_q88"]) / 2
    np.testing.assert_allclose(p["posteriors_multi_scale_dense"], dense, atol=1e-6)
    fused = (dense + p["posteriors_multi_crop"]) / 2
    np.testing.assert_allclose(p["posteriors_multi_crop_dense"], fused, atol=1e-6)
    path = os.path.join(tiny_demo_dir, "val", p["ids"][0])
    for alignment in ("top_left", "centred"):  # Q = 88: a margin of 24, centred 12 each side
        alone = _alone(c, str(tmp_path), path, 88, alignment)
        close = np.allclose(p["posteriors_dense_q88"][0], alone, atol=1e-5)
        assert close == (alignment == "centred"), alignment
    c.eval.dense_alignment = "diagonal"
    with pytest.raises(UserError, match="config.eval.dense_alignment must be one of"):
        options.validate(c)


def _check_rows(summary: dict) -> None:
    """eval_results.json of two checkpoints and their fusion, every protocol: one row each."""
    assert (summary["images"], summary["bad_images"]) == (41, 1)
    rows = {r["name"]: r for r in summary["results"]}
    assert set(rows) == {
        f"{prefix}_{name}"
        for prefix in ("ckpt0", "ckpt1", "fusion")
        for name in (
            "dense_q72",
            "dense_q88",
            "dense_q104",
            "multi_scale_dense",
            "multi_crop",
            "multi_crop_dense",
            "centre_crop",
        )
    }
    assert rows["fusion_multi_scale_dense"]["test_scales"] == [72, 88, 104]
    assert rows["ckpt0_centre_crop"]["test_scales"] == [73]
    assert all(
        1 / 41 <= r["top1_error"] <= 1 and r["top5_error"] <= r["top1_error"] for r in rows.values()
    )


def _check_predictions(predictions: Any, ids: list[str]) -> dict[str, np.ndarray]:
    """predictions.npz: the broken image counted and uniform, the averages what they say;
    returns the first checkpoint's posteriors by protocol."""
    assert len(ids) == 41 and "circle/broken.jpg" in ids
    broken = ids.index("circle/broken.jpg")
    assert predictions["bad"].sum() == 1 and predictions["bad"][broken]
    fused = predictions["posteriors_fusion_multi_crop_dense"]
    assert fused.shape == (41, 10) and np.allclose(fused.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(fused[broken], 0.1)
    p = {k[len("posteriors_ckpt0_") :]: v for k, v in predictions.items() if "ckpt0_" in k}
    np.testing.assert_allclose(
        p["multi_scale_dense"], (p["dense_q72"] + p["dense_q88"] + p["dense_q104"]) / 3, atol=1e-6
    )
    np.testing.assert_allclose(
        p["multi_crop_dense"], (p["multi_scale_dense"] + p["multi_crop"]) / 2, atol=1e-6
    )
    return p


def _alone(config: Any, workdir: str, path: Any, q: int, alignment: str = "top_left") -> np.ndarray:
    """The flip-averaged dense posterior of the image at `path` at scale `q`, by the net alone;
    centred, on the image (and its mirror) less half of each side's margin (side % 32, the
    crop being a multiple of 32) at the top and left."""
    model = models.model_from_config(config)
    variables = checkpoints.restore_params(workdir)
    with open(path, "rb") as f:
        image = augment.rescale_smallest_side(augment.decode_image(f.read()), q)
    x = augment.subtract_mean(image, config.mean_rgb)
    dy, dx = np.asarray(x.shape[:2]) % 32 // 2 if alignment == "centred" else (0, 0)
    alone = [
        jax.nn.softmax(model.apply(variables, im[None, dy:, dx:], dense=True).mean((1, 2)))[0]
        for im in (x, x[:, ::-1])
    ]
    return (alone[0] + alone[1]) / 2


def _programs(folder: Any, names: list[str]) -> set:
    """The (kind, bucket) programs the images need: Q = 72, 88 and 104 run the same program
    (dense and multi-crop); 73 the centre crop."""
    expected = set()
    for name in names:
        with open(folder / name, "rb") as f:
            h, w = augment.decode_image(f.read()).shape[:2]
        expected |= {("Q", buckets.bucket_shape(*rescaled(h, w, q))) for q in (72, 88, 104)}
        expected.add(("centre", buckets.bucket_shape(*rescaled(h, w, 73))))
    return expected


# Helpers ---------------------------------------------------------------------------------------


def narrow(name):
    model = helpers.narrow(name, CROP)
    variables = helpers.init(model)
    # Non-zero biases (as in a trained net; BN's shift too) turn the zero padding non-zero.
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.1 if path[-1].key == "bias" else p, variables["params"]
    )
    return model, variables


@pytest.fixture(scope="module")
def net_a():
    return narrow("A")


def padded_batch(images, shape=(160, 160)):
    batch = np.zeros((len(images), *shape, 3), np.float32)
    for i, image in enumerate(images):
        batch[i, : image.shape[0], : image.shape[1]] = image
    return batch, jnp.asarray([image.shape[:2] for image in images], jnp.int32)


def random_images(shapes, seed=0, std=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, std, (*shape, 3)).astype(np.float32) for shape in shapes]


def test_batches_of_one_program_run_when_it_is_built_while_they_are_checked():
    """The program's build ends between the two batches' checks: the second runs first (taking
    it out of the waiting list compared the batches' arrays: ValueError), then the first."""

    class BuiltWhileChecked:
        checks = 0

        def done(self):
            self.checks += 1
            return self.checks > 1

    program = BuiltWhileChecked()
    batches = [scheduler._Batch(np.arange(2) + i, np.zeros(2), (np.zeros(3),)) for i in (0, 2)]
    run = object.__new__(scheduler.Pass)
    run.waiting, ran = [(program, batch) for batch in batches], []
    run.run = lambda program, batch: ran.append(batch.index.tolist())
    run.dispatch()
    assert ran == [[2, 3], [0, 1]] and run.waiting == []
