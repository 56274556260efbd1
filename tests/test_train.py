"""Training (Sect. 3.1, 3.3): data-parallel equivalence, resume, SIGTERM, init from A, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, run_main

from vggjax import checkpoints, pretrained, sharding, train
from vggjax.data import pipeline


def synthetic_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    crop = config.crop_size
    for _ in range(n):
        mask = np.ones(config.batch_size, np.float32)
        mask[-1] = 0.0  # an undecodable image: must not count
        yield dict(
            image=rng.normal(0, 50, (config.batch_size, crop, crop, 3)).astype(np.float32),
            label=rng.integers(0, config.num_classes, config.batch_size).astype(np.int32),
            mask=mask,
        )


@pytest.mark.parametrize("model", ["A", "vgg11_bn"])
def test_eight_devices_compute_the_same_update_as_one(tiny_config, model):
    """Sect. 3.3: "the result is exactly the same as when training on a single GPU".

    Each step starts both meshes from the same state, so float32 noise is not compounded.
    """
    assert jax.device_count() == 8
    tiny_config.model = model
    trainers = {
        n: train.Trainer(tiny_config, sharding.make_mesh(jax.devices()[:n])) for n in (8, 1)
    }
    state = jax.device_get(trainers[1].init(jax.random.key(0)))
    for batch in synthetic_batches(tiny_config, 3):
        after = {}
        for n, trainer in trainers.items():
            new, metrics = trainer.train_step(
                jax.device_put(state, trainer.replicated), trainer.global_batch(batch)
            )
            assert float(metrics["count"]) == tiny_config.batch_size - 1
            after[n] = jax.device_get(new)
        moved = max(
            np.abs(a - b).max()
            for a, b in zip(jax.tree.leaves(after[1].params), jax.tree.leaves(state.params))
        )
        assert moved > 1e-4  # the step changed the parameters
        # Equal up to float32 summation order (conv gradients sum 10⁵ terms in another order):
        # under a thousandth of the step, where a wrong average (a sum over devices, or one
        # device's shard alone) would be off by the order of the step itself.
        for a, b in zip(
            jax.tree.leaves((after[8].params, after[8].opt_state)),
            jax.tree.leaves((after[1].params, after[1].opt_state)),
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * moved)
        # BN running averages are statistics of the global batch, not of each device's shard
        # (off by tens of percent). Rounding is relative to each array's scale: a mean near 0
        # differed by 6e-8 (1e-4 of itself, 4e-6 of the array's largest) with vggjax's CPU
        # defaults, measured.
        for a, b in zip(
            jax.tree.leaves(after[8].batch_stats), jax.tree.leaves(after[1].batch_stats)
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        state = after[1]


def _step_on(trainer, state, batch):
    new, metrics = trainer.train_step(jax.device_put(state, trainer.replicated), batch)
    return jax.device_get((new, metrics))


@pytest.mark.parametrize("model", ["A", "vgg11_bn"])
def test_a_masked_image_changes_nothing(tiny_config, model):
    """An undecodable image (mask 0) is in the batch but counts nowhere: the loss, the gradients,
    the update, batch norm's statistics and running averages equal those of the batch without it.
    Net A checks the loss mask alone; vgg11_bn the batch-norm mask too."""
    tiny_config.model = model
    trainer = train.Trainer(tiny_config, sharding.make_mesh(jax.devices()[:1]))
    state = jax.device_get(trainer.init(jax.random.key(0)))
    full = next(synthetic_batches(tiny_config, 1))
    full["image"][-1] = 255.0  # what the masked slot holds must not matter
    without = {k: v[:-1] for k, v in full.items()}
    masked, masked_metrics = _step_on(trainer, state, full)
    alone, alone_metrics = _step_on(trainer, state, without)
    for k in ("loss", "top1_errors", "count"):
        np.testing.assert_allclose(masked_metrics[k], alone_metrics[k], rtol=1e-5)
    # atol: the conv biases before a batch norm have a zero gradient in exact arithmetic; 15
    # rows or 16 summed leave them (and their momentum) float32 noise of about 5e-7.
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(alone)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    # The same slot counted (mask 1) moves the parameters: the comparison can fail.
    full["mask"][-1] = 1.0
    counted, _ = _step_on(trainer, state, full)
    assert not all(
        np.allclose(a, b, rtol=1e-4, atol=2e-6)
        for a, b in zip(jax.tree.leaves(counted.params), jax.tree.leaves(alone.params))
    )


def test_the_step_compiled_ahead_is_the_one_the_loop_runs(tiny_config):
    """`_Run` compiles the train step while the data is read (`compile_ahead`): the first step
    on the pipeline's batches must not compile it again."""
    trainer = train.Trainer(tiny_config, sharding.make_mesh(), 10, 5)
    trainer.compile_ahead().result()
    states = [trainer.init(jax.random.key(0)) for _ in range(2)]  # each step donates its own
    batch = trainer.global_batch(next(iter(pipeline.train_dataset(tiny_config))))
    other = batch | {"image": batch["image"].astype(jnp.float32)}  # another program
    compiled = []

    def listen(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(trainer.train_step(states[0], batch))
        assert not compiled
        jax.block_until_ready(trainer.train_step(states[1], other))  # so the test can fail
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiled) == 1


def test_weight_decay_skips_biases_unless_asked(tiny_config):
    params = {"conv1_1": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    for biases, expected in ((False, 0.0), (True, 1.0)):
        tiny_config.weight_decay_biases = biases
        tx = train.make_optimizer(tiny_config)
        updates, _ = tx.update(zero, tx.init(params), params)
        # SGD's step is -lr * (grad + wd * w): zero gradient leaves only the decay term.
        kernel_step = -tiny_config.learning_rate * tiny_config.weight_decay
        np.testing.assert_allclose(updates["conv1_1"]["kernel"], kernel_step, rtol=1e-6)
        np.testing.assert_allclose(updates["conv1_1"]["bias"], kernel_step * expected, rtol=1e-6)


def test_learning_rate_drops_by_10_on_plateau_at_most_3_times(tiny_config):
    trainer = train.Trainer(tiny_config, sharding.make_mesh(jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    plateau = state.plateau
    scales = []
    errors = [0.9, 0.8] + [0.8] * 20  # improves, then stops improving
    for e in errors:
        plateau = trainer.plateau_step(plateau, state.params, jnp.float32(e))
        scales.append(float(plateau.scale))
    assert scales[:2] == [1.0, 1.0]
    distinct = sorted(set(np.round(scales, 8)), reverse=True)
    np.testing.assert_allclose(distinct, [1.0, 0.1, 0.01, 0.001], rtol=1e-5)
    # Drops on the `patience`-th pass in a row without improvement, not before.
    first_flat, patience = 2, tiny_config.plateau_patience
    assert scales[first_flat + patience - 2] == 1.0
    assert scales[first_flat + patience - 1] == pytest.approx(0.1)


def read_params(workdir):
    return jax.device_get(checkpoints.restore_params(workdir)["params"])


def test_resume_equals_straight_run_and_writes_results(tiny_config, tmp_path):
    tiny_config.num_train_steps = 4
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert checkpoints.Checkpoints(str(tmp_path / "resumed")).latest_step() == 4
    tiny_config.num_train_steps = 8
    resumed = train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    straight = train.train_and_evaluate(tiny_config, str(tmp_path / "straight"))
    assert resumed["step"] == straight["step"] == 8
    for a, b in zip(
        jax.tree.leaves(read_params(tmp_path / "resumed")),
        jax.tree.leaves(read_params(tmp_path / "straight")),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["val_images"] == 40 and 0 <= results["top1_error"] <= 1
    assert results["top5_error"] <= results["top1_error"]
    assert any(
        p.name.startswith("events") for p in (tmp_path / "straight" / "tensorboard").iterdir()
    )
    written = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert (written["model"], written["num_classes"]) == (tiny_config.model, 10)
    folders = sorted(os.listdir(os.path.join(tiny_config.data_dir, "train")))
    assert [c.id for c in pretrained.class_names(str(tmp_path / "straight"))] == folders


def test_restore_params_on_another_device_count(tiny_config, tmp_path):
    tiny_config.num_train_steps = 2
    train.train_and_evaluate(tiny_config, str(tmp_path))  # written from 8 devices
    mesh = sharding.make_mesh(jax.devices()[:2])
    restored = checkpoints.restore_params(
        str(tmp_path / "checkpoints" / "2"),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
    kernel = restored["params"]["fc8"]["kernel"]
    assert kernel.sharding.mesh.size == 2 and kernel.shape == (32, 10)
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoints.restore_params(str(tmp_path / "nope"))


def test_profile_steps_trace_those_steps_into_the_workdir(tiny_config, tmp_path):
    """config.profile_steps = (FIRST, LAST): jax.profiler's trace (an .xplane.pb, which
    TensorBoard's profile tab and XProf read) of train steps FIRST to LAST in WORKDIR/profile."""
    tiny_config.num_train_steps, tiny_config.profile_steps = 3, (2, 3)
    train.train_and_evaluate(tiny_config, str(tmp_path))
    (trace,) = (tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb")
    profile = jax.profiler.ProfileData.from_file(str(trace))
    steps = [
        dict(event.stats)["step_num"]
        for plane in profile.planes
        for line in plane.lines
        for event in line.events
        if event.name == "train"  # _Run.train_step's StepTraceAnnotation
    ]
    assert steps == [2, 3]


def test_half_written_checkpoint_is_never_loaded(tiny_config, tmp_path):
    tiny_config.num_train_steps = 4
    train.train_and_evaluate(tiny_config, str(tmp_path))
    # What a process killed mid-save leaves: orbax's temporary folder for a later step.
    partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    assert checkpoints.Checkpoints(str(tmp_path)).latest_step() == 4
    assert read_params(tmp_path)["fc8"]["kernel"].shape == (32, 10)


def _kill_during_a_save(args: list[str], checkpoint_dir) -> list[str]:
    """Starts training and SIGKILLs it while an asynchronous save after the first complete one
    is being written (orbax's temporary folder is there); the folder's names at the kill."""
    command = [sys.executable, "-m", "vggjax.main", *args, "--config.num_train_steps=100000"]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while True:
            names = [p.name for p in checkpoint_dir.iterdir()] if checkpoint_dir.exists() else []
            complete = [n for n in names if n.isdigit()]
            if complete and any("tmp" in n for n in names):
                proc.kill()
                return names
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()


def test_a_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(tiny_demo_dir, tmp_path):
    """SIGKILL while a save is in flight (wide FC layers: 34 MB of state to write) leaves a
    temporary folder; the same command then resumes from the last complete checkpoint, whose
    parameters are those an uninterrupted run had at that step, and ends where it ends."""
    args = [
        "--config=configs/demo.py",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.width=0.0625",
        "--config.fc_width=2048",
        "--config.num_workers=0",
        "--config.batch_size=16",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=1000",
    ]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    names = _kill_during_a_save([*args, f"--workdir={killed}"], killed / "checkpoints")
    last = max(int(n) for n in names if n.isdigit())
    left = [p.name for p in (killed / "checkpoints").iterdir()]
    assert any("tmp" in n for n in left), left  # the kill landed mid-write
    assert checkpoints.Checkpoints(str(killed)).latest_step() == last
    # On one device, as the killed run: float32 rounding differs between one and eight devices,
    # and the tiny BN net grows it to 1e-4 and more within a few steps (measured). Rounding, not
    # data parallelism: on one device, every parameter moved by one ulp grows as much (5 steps:
    # 1e-2 of a layer's movement, either way).
    one = dict(XLA_FLAGS="")
    result = run_main(*args, f"--workdir={killed}", f"--config.num_train_steps={last + 2}", **one)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from the checkpoint at step {last}" in result.stderr
    run_main(*args, f"--workdir={straight}", f"--config.num_train_steps={last + 2}", **one)
    for step in (last, last + 2):
        for a, b in zip(
            jax.tree.leaves(checkpoints.restore_params(str(killed / "checkpoints" / str(step)))),
            jax.tree.leaves(checkpoints.restore_params(str(straight / "checkpoints" / str(step)))),
        ):  # the same on the same device (measured); a tolerance in case a platform's is not
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_init_from_net_a_copies_the_papers_seven_layers(tiny_config, tmp_path):
    tiny_config.num_train_steps = 2
    train.train_and_evaluate(tiny_config, str(tmp_path / "a"))
    net_a = read_params(tmp_path / "a")
    tiny_config.model = "D"
    tiny_config.init_from = str(tmp_path / "a")
    trainer = train.Trainer(tiny_config, sharding.make_mesh())
    net_d = jax.device_get(trainer.init(jax.random.key(1)).params)
    for name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"):
        np.testing.assert_array_equal(net_d[name]["kernel"], net_a[name]["kernel"])
    for name in ("conv1_2", "conv2_2", "conv3_3", "conv4_1", "conv5_3"):
        assert (
            name not in net_a
            or net_d[name]["kernel"].shape != net_a[name]["kernel"].shape
            or not np.array_equal(net_d[name]["kernel"], net_a[name]["kernel"])
        )
    tiny_config.model, tiny_config.init_layers = "B-shallow", "net_a"
    with pytest.raises(ValueError, match="layer conv1_1 has shape"):
        train.Trainer(tiny_config, sharding.make_mesh()).init(jax.random.key(1))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    tiny_config.num_train_steps = 4
    train.train_and_evaluate(tiny_config, str(tmp_path))
    good = read_params(tmp_path)
    tiny_config.num_train_steps, tiny_config.learning_rate = 20, 1e12
    with pytest.raises(FloatingPointError, match="NaN/Inf.*step 4"):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    assert checkpoints.Checkpoints(str(tmp_path)).latest_step() == 4
    for a, b in zip(jax.tree.leaves(read_params(tmp_path)), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)


def test_demo_command_trains_and_sigterm_checkpoints_and_resumes(tiny_demo_dir, tmp_path):
    args = [
        "--config=configs/demo.py",
        f"--workdir={tmp_path}",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.width=0.0625",
        "--config.num_workers=0",
        "--config.batch_size=16",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1000",
        "--config.num_train_steps=100000",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    command = [sys.executable, "-m", "vggjax.main", *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until training is under way
            if "step 3/" in line:
                break
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - start < 30
    finally:
        proc.kill()
        proc.stderr.close()
    step = checkpoints.Checkpoints(str(tmp_path)).latest_step()
    assert step is not None and step >= 3
    # The same command resumes from there and finishes a short budget with results.
    result = run_main(*args[:-1], f"--config.num_train_steps={step + 2}", XLA_FLAGS="")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from the checkpoint at step {step}" in result.stderr
    assert json.loads((tmp_path / "results.json").read_text())["step"] == step + 2


def test_bfloat16_compute_trains_float32_parameters(tiny_config):
    tiny_config.dtype = "bfloat16"
    trainer = train.Trainer(tiny_config, sharding.make_mesh())
    state = trainer.init(jax.random.key(0))
    before = jax.device_get(state.params)
    for batch in synthetic_batches(tiny_config, 2):
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before))
    )
