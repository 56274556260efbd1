"""Multi-host training (Sect. 3.3 across hosts): two CPU processes on 127.0.0.1 stand in for two
hosts of a pod, each with 4 of the 8 devices, running the same command with jax.distributed."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, run_main

from vggjax import checkpoints, sharding, train


def test_two_processes_train_stop_on_sigterm_and_resume_like_one(tiny_config, tmp_path):
    """2 processes × 4 devices, stopped by SIGTERM to one of them and resumed for 2 more steps,
    end where 1 process × 8 devices does in a straight run: same global batches, same update,
    one shared checkpoint."""
    workdir = tmp_path / "two"
    args = [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data_dir={tiny_config.data_dir}",
        f"--config.width={tiny_config.width}",
        f"--config.fc_width={tiny_config.fc_width}",
        f"--config.batch_size={tiny_config.batch_size}",
        "--config.num_workers=0",
        "--config.log_every_steps=2",
        "--config.eval_every_steps=1000",
        "--config.checkpoint_every_steps=4",
    ]
    first = run_two_processes(
        args + ["--config.num_train_steps=1000"], tmp_path, sigterm_after="step 4/1000"
    )
    assert "Process 1 of 2; 8 devices in all" in first[1]
    # Both stop at the same step, whichever was preempted, and save it together.
    step = int(re.search(r"Stopped at step (\d+) on SIGTERM", first[0])[1])
    assert step >= 4 and f"Stopped at step {step} on SIGTERM" in first[1]
    # Each process saved its own data-iterator position beside the shared state.
    data = workdir / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in data.glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    second = run_two_processes(args + [f"--config.num_train_steps={step + 2}"], tmp_path)
    assert all(f"Resumed from the checkpoint at step {step}" in o for o in second)
    # Only process 0 reports progress.
    done = f"step {step + 2}/{step + 2}"
    assert done in second[0] and done not in second[1]

    tiny_config.num_train_steps = step + 2
    _assert_ends_like_one_process(tiny_config, workdir, tmp_path / "one")


def _assert_ends_like_one_process(tiny_config, workdir, one_dir) -> None:
    """The two processes' checkpoint in `workdir` holds what a straight run of `tiny_config` on 8
    devices in one process (written to `one_dir`) ends with."""
    train.train_and_evaluate(tiny_config, str(one_dir))  # 8 devices, one process
    two = jax.device_get(checkpoints.restore_params(str(workdir)))
    one = jax.device_get(checkpoints.restore_params(str(one_dir)))
    init = jax.device_get(
        train.Trainer(tiny_config, sharding.make_mesh())
        .init(jax.random.key(tiny_config.seed))
        .params
    )
    # Each leaf against its own movement: the two runs sum the same gradients in another order
    # (each process's rows, then gloo's all-reduce), 5e-6 of a leaf's movement apart after 4
    # steps, measured. A wrong average (a sum over processes, one host's half of the batch) or
    # an unstable reduction (batch norm's E[x²] − mean², 10% after 4 steps) is far off. The
    # 1e-6 floor: conv biases before a batch norm have a zero gradient in exact arithmetic;
    # what moves them is rounding (3e-8 after 6 steps with JAX's CPU defaults; 1e-7, and the
    # two runs 2e-7 apart, with vggjax's, measured), where real movement is 1e-3 and more.
    leaves = jax.tree_util.tree_leaves_with_path
    for (path, a), b, start in zip(
        leaves(two["params"]), jax.tree.leaves(one["params"]), jax.tree.leaves(init)
    ):
        moved = np.abs(b - start).max()
        assert np.abs(a - b).max() <= 1e-4 * moved + 1e-6, jax.tree_util.keystr(path)
    assert np.abs(one["params"]["conv1_1"]["kernel"] - init["conv1_1"]["kernel"]).max() > 1e-3
    # BN running averages: statistics of the global batch, not of one host's half.
    for a, b in zip(jax.tree.leaves(two["batch_stats"]), jax.tree.leaves(one["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num_processes=2", "--process_id=2"], "--process_id must be less than --num_processes"),
        (
            ["--coordinator_address=127.0.0.1:1234"],
            "Number of processes must be defined. Outside a "
            "TPU pod, SLURM or Open MPI job, give --coordinator_address, --num_processes and "
            "--process_id",
        ),
    ],
)
def test_bad_distributed_flags_get_one_clear_line(tiny_demo_dir, tmp_path, flags, message):
    result = run_main(
        "--config=configs/demo.py",
        f"--workdir={tmp_path}",
        f"--config.data_dir={tiny_demo_dir}",
        *flags,
        timeout=120,
        XLA_FLAGS="",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_two_processes_extract_the_features_one_does(trained_demo_net, tiny_demo_dir, tmp_path):
    """`--mode=features` (the inference engine) on 2 processes × 4 devices: each reads and runs its
    share of the images, all are gathered in order, process 0 alone writes, and the file equals
    one process's."""
    args = [
        "--config=configs/demo.py",
        "--mode=features",
        f"--workdir={tmp_path / 'two'}",
        "--config.dataset=folder",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.num_workers=0",
        "--config.eval.batch_size=8",
        "--config.features.scales=(72,104)",
        "--config.features.splits=('val',)",
        f"--config.features.checkpoints=('{trained_demo_net}',)",
    ]
    outputs = run_two_processes(args, tmp_path)
    assert "features_val.npz: 40 images" in outputs[0] and "Wrote" not in outputs[1]

    from vggjax import recipe  # one process, 8 devices
    from vggjax.evaluators import features

    c = recipe.paper_recipe("A")
    c.dataset, c.data_dir, c.num_workers, c.eval.batch_size = "folder", tiny_demo_dir, 0, 8
    c.features.scales, c.features.splits = (72, 104), ("val",)
    c.features.checkpoints = (trained_demo_net,)
    one = features.run(c, str(tmp_path / "one"))["val"]
    two = np.load(tmp_path / "two" / "features_val.npz")
    assert list(two["ids"]) == list(one["ids"]) and np.array_equal(two["labels"], one["labels"])
    np.testing.assert_allclose(two["features"], one["features"], rtol=0, atol=1e-6)


# Helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(
    args: list[str], log_dir, sigterm_after: str | None = None, timeout: float = 240
) -> list[str]:
    """Runs `python -m vggjax.main ARGS` as processes 0 and 1 of a 2-process job; their output.

    With `sigterm_after`, process 1 alone gets SIGTERM once process 0 has logged that text: one
    host preempted before the others.
    """
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"--coordinator_address=127.0.0.1:{free_port()}"
    logs = [log_dir / f"process_{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the job
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "vggjax.main",
                            *args,
                            address,
                            "--num_processes=2",
                            f"--process_id={i}",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout
        while sigterm_after and sigterm_after not in logs[0].read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.2)
        if sigterm_after:
            procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return outputs
