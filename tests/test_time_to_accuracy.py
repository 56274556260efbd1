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
    """One epoch of a narrow net, both frameworks (the peer from vggjax's initial weights), seed 3
    through --seeds: its per-epoch seconds and accuracies, the seconds to the target, the ratio
    and the host, then the line across seeds that restates them."""
    done = _benchmark(
        tmp_path,
        tiny_folder,
        "--target=0",
        "--torch_compile=eager",
        "--peer_init=vggjax",
        "--seeds=3",
        f"--workdir={tmp_path / 'runs'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *_, line, summary = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert line["steps_per_epoch"] == 3 and line["target"] == 0 and line["seed"] == 3
    assert line["host"]["cpus"] == len(os.sched_getaffinity(0))
    for name in ("jax", "torch"):
        run = line[name]
        (epoch,) = run["epochs"]
        # eval_seconds is rounded to 10 ms: the peer tests 8 images in less
        assert epoch["epoch"] == 1 and epoch["seconds"] > 0 and epoch["eval_seconds"] >= 0
        assert epoch["accuracy"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
        assert run["final_accuracy"] == epoch["accuracy"]
        assert run["seconds_to_target"] == run["train_seconds"] == epoch["seconds"]
        assert summary[f"median_{name}_seconds_to_target"] == round(epoch["seconds"], 3)
    assert line["torch"]["variant"] == "eager" and line["torch"]["peer_init"] == "vggjax"
    ratio = line["jax"]["seconds_to_target"] / line["torch"]["seconds_to_target"]
    assert line["time_to_target_jax_over_torch"] == pytest.approx(ratio, abs=1e-3)
    assert [s["seed"] for s in summary["seeds"]] == [3]
    assert summary["jax_first"] + summary["torch_first"] == 1
    assert any((tmp_path / "runs" / "seed_3").iterdir())  # the seed's vggjax run


def _line(seed: int, jax: float | None, torch: float | None) -> dict:
    """A seed's JSON line, as far as the line across seeds reads it."""
    return dict(
        seed=seed,
        jax=dict(seconds_to_target=jax, train_seconds=300.0),
        torch=dict(seconds_to_target=torch, train_seconds=400.0),
        time_to_target_jax_over_torch=time_to_accuracy._ratio(jax, torch),
        train_time_jax_over_torch=0.75,
    )


def test_across_seeds_medians_count_a_missed_target_as_slowest():
    summary = time_to_accuracy.across_seeds(
        [_line(0, 100.0, 120.0), _line(1, 200.0, 150.0), _line(2, None, 300.0)]
    )
    assert summary["median_jax_seconds_to_target"] == 200.0
    assert summary["median_torch_seconds_to_target"] == 150.0
    assert summary["median_time_to_target_jax_over_torch"] == 1.333  # of 0.833, 1.333, None
    assert summary["median_train_time_jax_over_torch"] == 0.75
    assert (summary["jax_first"], summary["torch_first"]) == (1, 2)
    two = time_to_accuracy.across_seeds([_line(0, 100.0, 120.0), _line(1, None, 150.0)])
    assert two["median_jax_seconds_to_target"] is None  # the mean of 100 and never
    assert two["median_torch_seconds_to_target"] == 135.0


def test_benchmark_fails_in_one_line(tmp_path, tiny_folder):
    done = _benchmark(tmp_path, tiny_folder, "--target=0.9", "--epochs=0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("time_to_accuracy: error: ")


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--seeds=1,x"], "integers"),
        (["--seeds=1,2", "--seed=1"], "not both"),
        (["--seeds=2,1,2"], "twice"),
        (["--seeds=1", "--frameworks=jax"], "both"),
    ],
)
def test_seeds_refuses_what_it_cannot_run(flags, error):
    """Before any seed's run starts (the one-line form of a UserError: the test above)."""
    time_to_accuracy.FLAGS(["time_to_accuracy", *flags])
    try:
        with pytest.raises(UserError, match=error):
            time_to_accuracy.main([])
    finally:
        time_to_accuracy.FLAGS.unparse_flags()


def _as_vggjax(peer) -> dict:
    """The peer's weights as vggjax variables, through vggjax.convert's torchvision reader
    (torch_vgg's modules renamed to torchvision's: features.N, classifier.0/3/6)."""
    from vggjax.convert import layout

    fc_names = dict(zip(("3", "6", "9"), layout.TORCH_FC_NAMES["torchvision"]))
    tensors = {}
    for key, value in peer.net.state_dict().items():
        module, _, rest = key.partition(".")
        name = f"features.{rest}" if module == "0" else f"{fc_names[module]}.{rest}"
        tensors[name] = value.detach().contiguous().numpy()
    convs, fcs = layout.torch_layers("peer", tensors, "torchvision")
    return layout.build_variables("peer", "vgg11_bn", convs, fcs)[1]


def test_peer_starts_from_vggjax_weights_with_peer_init_vggjax():
    """--peer_init=vggjax: the peer's weights and batch-norm statistics are exactly those vggjax's
    run starts from (read back through vggjax.convert's torchvision reader; a 64-pixel crop, so
    fc6's inputs are a 2×2 map whose flattening differs), and not its own draws'."""
    import jax

    c = recipe.paper_recipe("vgg11_bn", "64")
    c.num_classes, c.crop_size, c.width, c.fc_width = 10, 64, 1 / 16, 32
    c.kernel_init = "he"
    initial = time_to_accuracy.vggjax_initial(c)
    peer = time_to_accuracy._Peer(c, "cpu", compiled=False, initial=initial)
    own = _as_vggjax(time_to_accuracy._Peer(c, "cpu", compiled=False))
    theirs = _as_vggjax(peer)
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, initial[collection], theirs[collection])
    assert not np.array_equal(own["params"]["fc6"]["kernel"], initial["params"]["fc6"]["kernel"])


def test_peer_step_is_vggjax_step():
    """From the same weights, two SGD steps of the peer (augmentation included, here the
    identity: 32-pixel mirror-symmetric images, no colour shift) give vggjax's weights and
    batch-norm statistics, and the same test accuracy."""
    import jax
    import torch

    from vggjax import sharding, train

    c = recipe.paper_recipe("vgg11_bn", "32")
    c.num_classes, c.crop_size, c.width, c.fc_width, c.dropout_rate = 10, 32, 1 / 16, 32, 0.0
    c.kernel_init, c.batch_size, c.learning_rate, c.colour_shift_std = "he", 8, 0.05, 0.0
    c.mean_rgb, c.weight_decay = (100.0, 110.0, 120.0), 0.1  # a decay large enough to see
    peer = time_to_accuracy._Peer(c, "cpu", compiled=False)
    trainer = train.Trainer(c, sharding.make_mesh())
    variables = _as_vggjax(peer)
    state = trainer.init(jax.random.key(0))
    state = state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=trainer.tx.init(variables["params"]),
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (c.batch_size, 32, 32, 3), np.uint8)
    images = ((images.astype(np.uint16) + images[:, :, ::-1]) // 2).astype(np.uint8)
    labels = rng.integers(0, 10, c.batch_size).astype(np.int32)
    shift = np.tile(-np.asarray(c.mean_rgb, np.float32), (c.batch_size, 1))
    batch = trainer.global_batch(
        dict(image=images, shift=shift, label=labels, mask=np.ones(c.batch_size, np.float32))
    )
    nchw, targets = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)
    for _ in range(2):
        state, _ = trainer.train_step(state, batch)
        peer.train_step(nchw, targets.long())
    theirs = _as_vggjax(peer)
    for collection, ours, rtol in (
        ("params", state.params, 2e-3),
        # PyTorch's running variance takes the batch's unbiased (n / (n - 1)), flax's the biased:
        # here n is 32 at the last convs (a batch of 8, 2 × 2 maps); 512 at batch 128.
        ("batch_stats", state.batch_stats, 1e-2),
    ):
        jax.tree.map(
            lambda a, b, rtol=rtol: np.testing.assert_allclose(a, b, rtol=rtol, atol=2e-4),
            jax.device_get(ours),
            theirs[collection],
        )
    errors = jax.device_get(trainer.eval_step(state, batch))["top1_errors"]
    assert peer.accuracy(nchw, targets) == pytest.approx(1 - errors / c.batch_size)
