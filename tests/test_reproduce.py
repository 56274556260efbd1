"""python -m vggjax.reproduce: a plan's stages in dependency order, finished ones skipped, a
killed plan resumed, REPORT.md's numbers read from the stages' own files, bad plans in one line,
the SLURM and TPU launchers' dry runs, and the miniature plan's smoke test."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT

from vggjax import reproduce, storage
from vggjax.errors import UserError
from vggjax.reproduce import __main__ as main
from vggjax.reproduce import fuse, plan, plots, report, run
from vggjax.reproduce.plan import Evaluation, Plan, Run

MINI = "configs/plans/miniature.py"


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)  # plans name their configs from the checkout, as the README runs them


def test_paper_plan_runs_each_stage_after_the_stages_it_needs():
    stages = plan.stages(plan.load("configs/plans/paper.py"), "/r")
    names = [s.name for s in stages]
    assert [n.split("/")[0] for n in names].count("runs") == 12
    assert len(names) == 12 + 12 + 2 and len(set(names)) == len(names)
    for i, stage in enumerate(stages):
        assert all(names.index(need) < i for need in stage.needs), stage.name
    by_name = {s.name: s for s in stages}
    b = by_name["runs/B-256"]  # Sect. 3.1: from net A, N(0, 1e-2) for the rest
    assert b.command("/r") == [
        "python", "-m", "vggjax.main", "--workdir=/r/runs/B-256", "--config=configs/vgg13.py:256",
        "--config.kernel_init=normal", "--config.init_from=/r/runs/A-256",
    ]  # fmt: skip
    assert by_name["runs/D-384"].needs == ("runs/D-256",)
    assert by_name["runs/E-256-512"].args == (
        "--config=configs/vgg19.py:256-512", "--config.init_from=/r/runs/E-384",
    )  # fmt: skip
    assert "--config.eval.scales=(256, 384, 512)" in by_name["evals/D-256-512"].args
    assert '--config.eval.checkpoints=("/r/runs/D-256-512",)' in by_name["evals/D-256-512"].args
    assert by_name["fusions/D+E"].needs == ("evals/D-256-512", "evals/E-256-512")
    glorot = {s.name: s for s in plan.stages(plan.load("configs/plans/paper.py:glorot"), "/r")}
    assert glorot["runs/B-256"].needs == () and glorot["runs/B-256"].args == (
        "--config=configs/vgg13.py:256",
    )
    folder = plan.stages(plan.load("configs/plans/folder.py:/data/flowers"), "/r")
    assert "--config.data_dir=/data/flowers" in folder[0].args
    only = plan.select(plan.stages(plan.load(MINI), "/r"), ["evals/B-72"])
    assert [s.name for s in only] == ["runs/A-72", "runs/B-72", "evals/B-72"]


def _write_plan(tmp_path, body):
    path = tmp_path / "bad_plan.py"
    path.write_text("from vggjax.reproduce.plan import *\n\ndef get_plan():\n    return " + body)
    return str(path)


@pytest.mark.parametrize(
    "body,message",
    [
        ("None", "returned NoneType, not a Plan"),
        ("Plan((Run('a', 'configs/demo.py', init_from='b'),), ())", "init_from names 'b'"),
        ("Plan((Run('a', 'configs/demo.py'),) * 2, ())", "names two runs a"),
        ("Plan((Run('a', 'configs/nope.py'),), ())", "config file 'configs/nope.py' not found"),
        (
            "Plan((Run('a', 'configs/demo.py'),), (Evaluation('e', 'a', ('dense', 'best'), (72,)),))",
            "protocol must be one of",
        ),
        (
            "Plan((Run('a', 'configs/demo.py', init_from='b'), Run('b', 'configs/demo.py', "
            "init_from='a')), ())",
            "in a cycle",
        ),
    ],
)
def test_a_bad_plan_is_a_user_error(tmp_path, body, message):
    with pytest.raises(UserError, match=re.escape(message)):
        plan.stages(plan.load(_write_plan(tmp_path, body)), "/r")


def test_bad_plan_input_ends_with_one_line_and_exit_status_2(tmp_path):
    result = _reproduce("--plan=configs/plans/nope.py", f"--root={tmp_path}", timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and lines == [
        "vggjax.reproduce: error: plan file 'configs/plans/nope.py' not found; the plans are in "
        "configs/plans/"
    ], result.stderr
    for args, message in [  # the same UserError, in-process
        (["--plan=configs/plans/folder.py", f"--root={tmp_path}"], "give the image folder"),
        ([f"--plan={MINI}", f"--root={tmp_path}", "--only=runs/Z"], "--only names no stage"),
        ([f"--plan={MINI}", f"--root={tmp_path}", "--batch=3"], "unknown flag --batch=3"),
        ([f"--plan={MINI}"], "--root is required"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            reproduce.reproduce(**main.parse_flags(["reproduce", *args]))


def _two_runs_and_an_evaluation():
    runs = (Run("a", "configs/demo.py"), Run("b", "configs/demo.py", {"seed": 1}, init_from="a"))
    return Plan(runs, (Evaluation("b", "b", ("dense",), (72,)),))


def test_finished_stages_are_skipped_and_a_failed_stage_stops_the_plan_until_rerun(tmp_path):
    root, ran = str(tmp_path), []

    def executor(failing):
        def execute(command):
            workdir = command[3].removeprefix("--workdir=")
            ran.append(os.path.relpath(workdir, root))
            if ran[-1] == failing:
                return 1
            done = "eval_results.json" if "--mode=eval" in command else "results.json"
            storage.write_json(os.path.join(workdir, done), {})
            return 0

        return execute

    stages = plan.stages(_two_runs_and_an_evaluation(), root)
    with pytest.raises(run.Stopped, match="runs/b ended .exit status 1. without .*results.json"):
        run.run_local(stages, root, executor=executor("runs/b"))
    assert ran == ["runs/a", "runs/b"]
    ran.clear()
    run.run_local(stages, root, executor=executor(None))
    assert ran == ["runs/b", "evals/b"]  # runs/a was finished
    ran.clear()
    run.run_local(stages, root, executor=executor(None))
    assert ran == []


def _eval_results(model, train_scale, rows):
    return dict(
        model=model,
        dataset="demo",
        train_scale=train_scale,
        results=[
            dict(name=name, method=method, test_scales=list(q), top1_error=t1, top5_error=t5)
            for name, method, q, t1, t5 in rows
        ],
    )


def _fill(root):
    """Results files of a few of the miniature plan's stages, with known numbers."""
    write = lambda path, value: storage.write_json(os.path.join(root, path), value)
    write(
        "runs/B-72/results.json",
        dict(model="B", step=400, eval_scale=72, top1_error=0.4321, top5_error=0.0987),
    )
    write("runs/B-72/config.json", dict(train_scale=[72, 72]))
    write("evals/B-72/eval_results.json", _eval_results("B", "72", [
        ("dense_q64", "dense", (64,), 0.5, 0.1),
        ("dense_q72", "dense", (72,), 0.3125, 0.0625),
        ("dense_q80", "dense", (80,), 0.4, 0.2),
        ("multi_scale_dense", "dense", (64, 72, 80), 0.2875, 0.0375),
    ]))  # fmt: skip
    write("fusions/D+E/eval_results.json", dict(
        model="D & E",
        members=[
            dict(model=m, train_scale="[72;144]", test_scales=[72, 108, 144]) for m in "DE"
        ],
        results=[dict(name="multi_crop", method="multi-crop", test_scales=[], top1_error=0.1111, top5_error=0.0222)],
    ))  # fmt: skip


def _cells(report_text, first):
    """The cells of the table row of REPORT.md starting with `first`."""
    for line in report_text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first:
            yield cells


MEASURED = {"train (S)", "test (Q)", "evaluation method", "net", "steps", "Q (crop)"}
MEASURED |= {"top-1 val. error (%)", "top-5 val. error (%)"}


def _measured_cells(report_text):
    """The cells of REPORT.md's tables in the columns of measured values."""
    header = None
    for line in report_text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else None
        if cells is None or cells[0].startswith("---"):
            header = header if cells else None
        elif header is None:
            header = cells
        else:
            yield from (cell for name, cell in zip(header, cells) if name in MEASURED)


def test_every_number_of_the_report_is_read_from_the_stages_files(tmp_path):
    root, the_plan = str(tmp_path), plan.load(MINI)
    text = pathlib.Path(report.write(the_plan, root, "empty")).read_text()
    assert set(_measured_cells(text)) == {"—"}  # nothing measured yet: the paper's numbers only
    _fill(root)
    text = pathlib.Path(report.write(the_plan, root, "filled")).read_text()
    table_3, table_4 = list(_cells(text, "B"))[:2]
    assert table_3 == ["B", "72", "72", "31.25", "28.7", "6.25", "9.9"]
    assert table_4 == ["B", "72", "64,72,80", "28.75", "28.2", "3.75", "9.6"]
    assert next(_cells(text, "B-72")) == ["B-72", "B", "72", "A-72", "400", "72", "43.21", "9.87"]
    fused = "(D/[72;144]/72,108,144), (E/[72;144]/72,108,144)"
    assert list(_cells(text, fused))[1] == [
        fused,
        "multi-crop",
        "11.11",
        "23.9",
        "2.22",
        "7.2",
        "—",
    ]
    assert next(_cells(text, "C")) == ["C", "—", "—", "—", "28.1", "—", "9.4"]
    assert [plots.depth(net) for net in ("A", "A-LRN", "B", "C", "D", "E")] == [
        11,
        11,
        13,
        16,
        16,
        19,
    ]
    results = json.loads(pathlib.Path(tmp_path / "evals/B-72/eval_results.json").read_text())
    results["results"][1]["top1_error"] = 0.5  # one number changed: the report follows
    storage.write_json(tmp_path / "evals/B-72/eval_results.json", results)
    text = pathlib.Path(report.write(the_plan, root, "changed")).read_text()
    assert next(_cells(text, "B"))[3] == "50.00"


def test_fusing_evaluations_averages_their_posteriors_into_eval_results(tmp_path):
    labels, ids = np.array([0, 1, 2, 0]), np.array([b"a", b"b", b"c", b"d"])
    posteriors = [
        np.array([[0.6, 0.4, 0], [0.6, 0.4, 0], [0, 0.3, 0.7], [0, 0.9, 0.1]]),
        np.array([[0.2, 0.8, 0], [0, 1.0, 0], [0, 0.2, 0.8], [0.4, 0.6, 0]]),
    ]
    folders = []
    for i, (model, p) in enumerate(zip("DE", posteriors)):
        folder = tmp_path / f"e{i}"
        storage.write_json(folder / "eval_results.json", _eval_results(model, "[72;144]", [
            ("multi_scale_dense", "dense", (72, 108, 144), 0, 0),
        ]))  # fmt: skip
        np.savez(
            folder / "predictions.npz",
            ids=ids,
            labels=labels,
            bad=np.zeros(4, bool),
            posteriors_multi_scale_dense=p,
        )
        folders.append(str(folder))
    summary = fuse.fuse(folders, str(tmp_path / "fused"))
    # averaged: image a → class 1 (0.6: wrong), b → 1, c → 2 (0.75), d → 1 (wrong)
    assert summary["results"] == [dict(
        name="multi_scale_dense", model="D & E", protocol="fusion", method="dense", test_scales=[],
        top1_error=0.5, top5_error=0.0,
    )]  # fmt: skip
    assert json.loads(pathlib.Path(tmp_path / "fused/eval_results.json").read_text()) == summary
    assert [m["model"] for m in summary["members"]] == ["D", "E"]


def test_the_report_plots_the_runs_logged_scalars(tmp_path):
    pytest.importorskip("matplotlib")
    import tensorboardX

    writer = tensorboardX.SummaryWriter(str(tmp_path / "runs/A-72/tensorboard"))
    for step, loss in ((10, 2.5), (20, 2.25), (30, 2.0)):
        writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("val/top1_error", 0.75, 30)
    writer.close()
    _fill(str(tmp_path))
    assert plots.curves(str(tmp_path), "A-72") == {
        "train/loss": [(10, 2.5), (20, 2.25), (30, 2.0)],
        "val/top1_error": [(30, 0.75)],
    }
    text = pathlib.Path(report.write(plan.load(MINI), str(tmp_path), "plots")).read_text()
    for png in ("training_curves.png", "error_vs_depth.png", "error_vs_q.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")


def _fakes(tmp_path):
    """sbatch and gcloud recording their arguments in calls.log: sbatch prints job ids 1, 2, ...;
    gcloud's training command writes the stage's results file, as the stage would."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    record = f'(IFS=$\'\\x1f\'; echo "$(basename "$0")$IFS$*") >> {log}\n'
    scripts = {
        "sbatch": f"echo $(( $(grep -c ^sbatch {log}) ))\n",
        "gcloud": "if [[ $4 == describe ]]; then exit 1; fi\n"
        'if [[ $* == *"setsid nohup"* ]]; then\n'
        '  w=$(grep -o -- "--workdir=[^ ]*" <<< "$*" | head -1); w=${w#--workdir=}; mkdir -p "$w"\n'
        "  [[ $* == *--mode=eval* ]] && f=eval_results.json || f=results.json\n"
        '  echo "{}" > "$w/$f"\n'
        "fi\n",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + record + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def _calls(log):
    return [line.split("\x1f") for line in log.read_text().splitlines()]


def _launch(capsys, root, launcher, launcher_args, dry_run):
    storage.write_json(os.path.join(root, "runs/A-72/results.json"), {})  # finished: not run
    reproduce.reproduce(
        MINI, root, launcher, launcher_args, ["--config.seed=3"], ["evals/B-72"], dry_run
    )
    return capsys.readouterr().out


def test_slurm_submits_each_stage_after_the_jobs_it_needs(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "plan")
    dry = _launch(capsys, root, "slurm", ["--nodes=2", "--time=1:00:00"], dry_run=True)
    slurm = os.path.join(ROOT, "launch", "slurm_gpu.sh")
    b_args = (
        "--config=configs/demo.py --config.model=B --config.dataset=demo "
        "--config.train_scale='(72, 72)' --config.eval_scale=72 --config.batch_size=32 "
        f"--config.num_train_steps=400 --config.init_from={root}/runs/A-72 --config.seed=3"
    )
    lines = dry.splitlines()
    assert lines[0] == (
        f"JOB_1=$(bash {slurm} --workdir={root}/runs/B-72 --job-name=runs-B-72 --no-follow "
        f"--nodes=2 --time=1:00:00 -- {b_args})"
    )
    assert lines[1].startswith(
        f"JOB_2=$(bash {slurm} --workdir={root}/evals/B-72 --job-name=evals-B-72 --no-follow "
        "--dependency=afterok:$JOB_1 --nodes=2 --time=1:00:00 -- --mode=eval --config=configs/demo.py"
    )
    assert lines[2] == (
        "JOB_3=$(sbatch --parsable --job-name=reproduce-report --dependency=afterok:$JOB_1:$JOB_2 "
        f"--output={root}/report-%j.out --wrap='python -m vggjax.reproduce --plan={MINI} "
        f"--root={root} --only=evals/B-72 --config.seed=3')"
    )
    bin_dir, log = _fakes(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    real = _launch(capsys, root, "slurm", ["--nodes=2", "--time=1:00:00"], dry_run=False)
    assert real == ""
    assert _calls(log) == [
        ["sbatch", "--parsable", f"{root}/runs/B-72/train.sbatch"],
        ["sbatch", "--parsable", "--dependency=afterok:1", f"{root}/evals/B-72/train.sbatch"],
        ["sbatch", "--parsable", "--job-name=reproduce-report", "--dependency=afterok:1:2",
         f"--output={root}/report-%j.out",
         f"--wrap=python -m vggjax.reproduce --plan={MINI} --root={root} --only=evals/B-72 --config.seed=3"],
    ]  # fmt: skip
    calls = _calls(log)
    log.unlink()
    subprocess.run(["bash", "-c", dry], check=True)  # the printed script does the same
    assert _calls(log) == calls
    batch = pathlib.Path(f"{root}/runs/B-72/train.sbatch").read_text()
    assert f"srun python -m vggjax.main --workdir={root}/runs/B-72 {b_args}" in batch
    assert "#SBATCH --nodes=2" in batch and "#SBATCH --time=1:00:00" in batch


def test_tpu_runs_the_stages_one_after_another_then_fuses_and_reports(
    tmp_path, monkeypatch, capsys
):
    root = str(tmp_path / "plan")
    pod = ["--name=pod", "--zone=us-central2-b"]
    dry = _launch(capsys, root, "tpu", pod, dry_run=True)
    tpu = os.path.join(ROOT, "launch", "tpu_pod.sh")
    lines = dry.splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        f"bash {tpu} --wait --workdir={root}/runs/B-72 --name=pod --zone=us-central2-b -- "
        "--config=configs/demo.py --config.model=B"
    )
    assert lines[1].startswith(f"bash {tpu} --wait --workdir={root}/evals/B-72 --name=pod")
    bin_dir, log = _fakes(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    _launch(capsys, root, "tpu", pod, dry_run=False)
    trains = [c[-1] for c in _calls(log) if "setsid nohup" in c[-1]]
    assert [re.search(r"--workdir=(\S+)", t)[1] for t in trains] == [
        f"{root}/runs/B-72", f"{root}/evals/B-72",
    ]  # fmt: skip
    follows = [c[-1] for c in _calls(log) if "tail" in c[-1]]
    assert (
        follows
        == ["--command=tail --pid=$(cat ~/vggjax-train.pid) -n +1 -F ~/vggjax-train.log"] * 2
    )
    assert os.path.exists(f"{root}/REPORT.md")


def _reproduce(*args, timeout=300, **popen):
    command = [sys.executable, "-m", "vggjax.reproduce", *args]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **popen)
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_miniature_plan_smoke_killed_and_resumed(tmp_path, tiny_demo_dir):
    """The miniature plan's stages for Table 3's net A (CI's smoke test: a few steps of a tiny
    net on the tiny demo set), killed (SIGKILL: the machine lost) once A has a checkpoint, and
    rerun: A resumes from it, is evaluated, and the report shows the evaluation's numbers."""
    root, log = tmp_path / "mini", tmp_path / "first.log"
    args = [
        f"--plan={MINI}", f"--root={root}", "--only=evals/A-72", f"--config.data_dir={tiny_demo_dir}",
        "--config.width=0.0625", "--config.fc_width=32", "--config.batch_size=8",
        "--config.num_workers=0", "--config.num_train_steps=30", "--config.checkpoint_every_steps=3",
        "--config.log_every_steps=3", "--config.eval.batch_size=8",
    ]  # fmt: skip
    with open(log, "w") as stderr:
        first = _reproduce(*args, start_new_session=True, stdout=stderr, stderr=stderr)
        checkpoints = root / "runs/A-72/checkpoints"
        deadline = time.monotonic() + 240
        while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (root / "runs/A-72/results.json").exists()
    second = _reproduce(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"Resumed from the checkpoint at step \d+", second.stderr)
    assert json.loads((root / "runs/A-72/results.json").read_text())["step"] == 30
    result = json.loads((root / "evals/A-72/eval_results.json").read_text())
    [dense] = result["results"]
    assert dense["name"] == "dense_q72"
    table_3 = next(_cells((root / "REPORT.md").read_text(), "A"))
    assert table_3 == [
        "A", "72", "72", report.percent(dense["top1_error"]), "29.6",
        report.percent(dense["top5_error"]), "10.4",
    ]  # fmt: skip
