"""A plan beyond one machine, through the launchers in launch/: the nets' stages (training and
evaluation) as SLURM jobs that wait on each other, or one after another on a TPU slice.

`--launcher=slurm` submits each unfinished stage with `launch/slurm_gpu.sh --no-follow
--dependency=afterok:<the jobs of the stages it needs>`, then one small job after all of them
that reruns the plan where it was launched: every net is then finished, so it fuses and writes
the report. `--launcher=tpu` runs each stage through `launch/tpu_pod.sh --wait`, then the
fusions and the report here. `--launcher_args` go to the launcher (nodes, GPUs, the slice...).
With `--dry_run` both print, as a shell script, what they would run.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence

from vggjax.reproduce import run
from vggjax.reproduce.plan import Stage

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "launch")


def _submit(command: Sequence[str]) -> str:
    """Runs a submitting command; the job id it prints last."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise run.Stopped(f"{run.shell_line(command)} failed: {result.stderr.strip()}")
    return result.stdout.split()[-1]


def slurm(
    stages: Sequence[Stage],
    root: str,
    launcher_args: Sequence[str],
    reproduce: Sequence[str],
    dry_run: bool = False,
) -> list[str]:
    """Submits the unfinished stages as jobs (`reproduce`: the command that finishes the plan,
    run in the last job); returns their job ids."""
    jobs: dict[str, str] = {}
    for stage in stages:
        if not stage.device or run.finished(stage, root):
            continue
        after = [jobs[need] for need in stage.needs if need in jobs]
        command = [
            "bash",
            os.path.join(LAUNCH, "slurm_gpu.sh"),
            f"--workdir={stage.workdir(root)}",
            f"--job-name={stage.name.replace('/', '-')}",
            "--no-follow",
            *([f"--dependency=afterok:{':'.join(after)}"] if after else []),
            *launcher_args,
            "--",
            *stage.args,
        ]
        jobs[stage.name] = _job(command, len(jobs) + 1, dry_run)
    after = [f"--dependency=afterok:{':'.join(jobs.values())}"] if jobs else []
    finish = ["sbatch", "--parsable", "--job-name=reproduce-report", *after]
    finish += [f"--output={os.path.join(root, 'report-%j.out')}"]
    finish += [f"--wrap={run.shell_line(reproduce)}"]
    return [*jobs.values(), _job(finish, len(jobs) + 1, dry_run)]


def _job(command: Sequence[str], number: int, dry_run: bool) -> str:
    """The job id of submitting `command`; in a dry run, printed as `JOB_N=$(command)`, the
    jobs it waits on as $JOB_M."""
    if not dry_run:
        return _submit(command)
    line = re.sub(r"(?<=:)JOB_(\d+)\b", r"$JOB_\1", run.shell_line(command))
    print(f"JOB_{number}=$({line})")
    return f"JOB_{number}"


def tpu(
    stages: Sequence[Stage], root: str, launcher_args: Sequence[str], dry_run: bool = False
) -> None:
    """Runs the unfinished stages of the nets one after another on the slice, then the
    fusions here."""
    for stage in stages:
        if not stage.device or run.finished(stage, root):
            continue
        command = [
            "bash",
            os.path.join(LAUNCH, "tpu_pod.sh"),
            "--wait",
            f"--workdir={stage.workdir(root)}",
            *launcher_args,
            "--",
            *stage.args,
        ]
        if dry_run:
            print(run.shell_line(command))
        else:
            run.run_stage(stage, root, command, run.execute)
    run.run_local([s for s in stages if not s.device], root, dry_run)
