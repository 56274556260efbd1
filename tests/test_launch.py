"""The launchers: what --dry-run prints is what a real launch runs (gcloud, sbatch and tail are
stand-ins here), and a bad argument gets one line and a non-zero exit."""

import os
import shlex
import subprocess
import tarfile

import pytest
from helpers import ROOT

TPU = [
    "--name=vgg-pod",
    "--zone=us-central2-b",
    "--accelerator=v4-32",
    "--workdir=/mnt/runs/d",
    "--",
    "--config=configs/vgg16.py",
    "--config.data_dir=/mnt/tfds",
    "--config.mean_rgb=(123.68, 116.779, 103.939)",
]
SLURM = [
    "--nodes=2",
    "--gpus-per-node=4",
    "--time=24:00:00",
    "--setup=source ~/venv/bin/activate",
    "--",
    "--config=configs/vgg16.py",
    "--config.data_dir=/shared/tfds",
]
TRAIN = (
    "python3 -m vggjax.main --workdir=/mnt/runs/d --config=configs/vgg16.py "
    "--config.data_dir=/mnt/tfds --config.mean_rgb='(123.68, 116.779, 103.939)'"
)


def test_tpu_dry_run_prints_create_install_train_on_all_workers_and_teardown(tmp_path):
    result = launch("tpu_pod.sh", "--dry-run", "--spot", *TPU, tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    tpu = "gcloud compute tpus tpu-vm"
    lines = result.stdout.splitlines()
    assert (
        f"{tpu} create vgg-pod --zone=us-central2-b --accelerator-type=v4-32 "
        f"--version=tpu-ubuntu2204-base --spot"
    ) in lines
    assert (
        f"{tpu} scp {tmp_path}/vggjax-vgg-pod.tar.gz vgg-pod:vggjax.tar.gz --worker=all "
        f"--zone=us-central2-b"
    ) in lines
    install, train, follow = [c for c in commands(result.stdout) if c[4] == "ssh"]
    assert "--worker=all" in install and install[-1] == (
        "--command=rm -rf ~/vggjax && mkdir ~/vggjax && tar -xzf ~/vggjax.tar.gz -C ~/vggjax && "
        'cd ~/vggjax && python3 -m pip install -q -e ".[tpu,gcs]"'
    )
    assert "--worker=all" in train and train[-1] == (
        f"--command=cd ~/vggjax && setsid nohup {TRAIN} > ~/vggjax-train.log 2>&1 < /dev/null & "
        "echo $! > ~/vggjax-train.pid"
    )
    assert "--worker=0" in follow and follow[-1] == "--command=tail -n +1 -F ~/vggjax-train.log"
    assert lines[-1] == f"{tpu} delete vgg-pod --zone=us-central2-b --quiet"


@pytest.mark.parametrize(
    "state,first", [("", ["create"]), ("PREEMPTED", ["delete", "create"]), ("READY", ["ssh"])]
)
def test_tpu_launch_runs_what_the_dry_run_prints(tmp_path, fakes, state, first):
    """A new slice is created, a preempted one recreated, one up reused once it is idle."""
    bin_dir, log = fakes
    dry = launch("tpu_pod.sh", "--dry-run", "--project=p", *TPU, tmp=tmp_path)
    real = launch("tpu_pod.sh", "--project=p", *TPU, path=bin_dir, tmp=tmp_path, state=state)
    assert real.returncode == 0, real.stderr
    ran = calls(log)
    assert [c[4] for c in ran[: 1 + len(first)]] == ["describe"] + first
    create, *rest, teardown = commands(dry.stdout)
    assert ran[1 + len(first) :] == rest  # copy, install, train, follow: as printed
    if "create" in first:
        assert ran[len(first)] == create
    if state == "PREEMPTED":
        assert ran[1] == teardown
    if state == "READY":
        assert ran[1][-1].startswith("--command=! kill -0 $(cat ~/vggjax-train.pid")
    assert commands(real.stdout)[-1] == teardown  # printed at the end, not run
    with tarfile.open(tmp_path / "vggjax-vgg-pod.tar.gz") as archive:
        names = archive.getnames()
    assert "vggjax/main.py" in names and "setup.py" in names
    assert not any(".pytest_cache" in n or "__pycache__" in n for n in names)


def test_tpu_launch_will_not_start_a_second_training_on_a_busy_slice(tmp_path, fakes):
    bin_dir, log = fakes
    result = launch("tpu_pod.sh", *TPU, path=bin_dir, tmp=tmp_path, state="READY", busy="1")
    assert result.returncode == 2
    assert result.stderr.startswith("tpu_pod.sh: error: vgg-pod is training already; follow it")
    assert [c[4] for c in calls(log)] == ["describe", "ssh"]  # nothing copied, nothing started


def test_slurm_dry_run_prints_the_batch_script(tmp_path):
    result = launch("slurm_gpu.sh", "--dry-run", f"--workdir={tmp_path}/run", *SLURM)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=24:00:00",
        "#SBATCH --signal=TERM@300",
        f"#SBATCH --output={tmp_path}/run/slurm-%j.out",
        "source ~/venv/bin/activate",
        f"cd {ROOT}",
        f"srun python -m vggjax.main --workdir={tmp_path}/run --config=configs/vgg16.py "
        f"--config.data_dir=/shared/tfds",
        f"sbatch --parsable {tmp_path}/run/train.sbatch",
    ]:
        assert line in out.splitlines(), line
    assert "JAX_LOCAL_DEVICE_IDS" not in out  # one process per GPU: SLURM's defaults suit JAX
    per_node = launch("slurm_gpu.sh", "--dry-run", "--per-node", f"--workdir={tmp_path}", *SLURM)
    assert "#SBATCH --ntasks-per-node=1" in per_node.stdout
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in per_node.stdout


def test_slurm_launch_submits_the_printed_script_and_follows_its_log(tmp_path, fakes):
    bin_dir, log = fakes
    workdir = tmp_path / "run"
    dry = launch("slurm_gpu.sh", "--dry-run", f"--workdir={workdir}", *SLURM)
    real = launch("slurm_gpu.sh", f"--workdir={workdir}", *SLURM, path=bin_dir)
    assert real.returncode == 0, real.stderr
    script = (workdir / "train.sbatch").read_text()
    assert script.strip() in dry.stdout
    assert calls(log) == [
        ["sbatch", "--parsable", f"{workdir}/train.sbatch"],
        ["tail", "-n", "+1", "-F", f"{workdir}/slurm-4242.out"],
    ]
    assert real.stdout.splitlines()[-1] == "scancel 4242"


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu_pod.sh", ["--zone=z", "--workdir=w", "--", "--config=c"], "--name is required"),
        ("tpu_pod.sh", ["--name=n", "--workdir=w", "--", "--config=c"], "--zone is required"),
        ("tpu_pod.sh", ["--name=n", "--zone=z", "--", "--config=c"], "--workdir is required"),
        ("tpu_pod.sh", ["--name=n", "--zone=z", "--workdir=w"], "no training command"),
        (
            "tpu_pod.sh",
            ["--name=n", "--zone=z", "--workdir=w", "--accelerator=v9-8", "--", "--config=c"],
            "unknown accelerator type 'v9-8'",
        ),
        ("tpu_pod.sh", ["--name=n", "--config=c"], "unknown option '--config=c'"),
        ("slurm_gpu.sh", ["--", "--config=c"], "--workdir is required"),
        (
            "slurm_gpu.sh",
            ["--workdir=w", "--nodes=two", "--", "--config=c"],
            "--nodes=two: must be a positive integer",
        ),
        (
            "slurm_gpu.sh",
            ["--workdir=w", "--", "--config=c", "--workdir=x"],
            "give --workdir before --",
        ),
        (
            "slurm_gpu.sh",
            ["--workdir=w", "--gpus=8", "--", "--config=c"],
            "unknown option '--gpus=8'",
        ),
    ],
)
def test_bad_arguments_get_one_clear_line(script, args, message):
    result = launch(script, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and message in lines[0]


# Helpers ---------------------------------------------------------------------------------------


def launch(script, *args, path=None, tmp=None, state="", busy=""):
    env = dict(os.environ, TMPDIR=str(tmp or "/tmp"), TPU_STATE=state, TPU_BUSY=busy)
    if path:
        env["PATH"] = f"{path}:{env['PATH']}"
    return subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def commands(stdout):
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def fakes(tmp_path):
    """gcloud, sbatch and tail that record their arguments in calls.log (one line per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    record = f'(IFS=$\'\\x1f\'; echo "$(basename "$0")$IFS$*") >> {log}\n'
    # `describe` prints $TPU_STATE, or fails as for a TPU that does not exist; with $TPU_BUSY
    # set, the check that no training runs fails.
    scripts = {
        "gcloud": 'if [[ $4 == describe ]]; then echo "$TPU_STATE"; [[ $TPU_STATE ]]; fi\n'
        'if [[ $* == *"kill -0"* && $TPU_BUSY ]]; then exit 1; fi\n',
        "sbatch": "echo 4242\n",
        "tail": "",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + record + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def calls(log):
    return [line.split("\x1f") for line in log.read_text().splitlines()]
