"""The paper's experiments in one command: a plan of training runs, evaluations and fusions,
carried out in dependency order (here, as SLURM jobs, or on a TPU slice), then ROOT/REPORT.md.

    python -m vggjax.reproduce --plan=configs/plans/miniature.py --root=/tmp/vggjax-mini

- `plan`: a plan as data (configs/plans/*.py's `get_plan`) and its stages, each a command line;
- `paper`: the paper's grid (Tables 3–6) and its numbers;
- `run`: stages on this machine, finished ones skipped, the others resumed;
- `launchers`: stages as SLURM jobs or on a TPU slice (launch/*.sh);
- `fuse`: Table 6's fusion of finished evaluations (`python -m vggjax.reproduce.fuse`);
- `report`, `plots`: REPORT.md and its PNGs, every number read from the stages' files.
"""

from __future__ import annotations

from collections.abc import Sequence

from vggjax import storage
from vggjax.reproduce import launchers, plan, report, run


def reproduce(
    plan_path: str,
    root: str,
    launcher: str = "local",
    launcher_args: Sequence[str] = (),
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    dry_run: bool = False,
) -> None:
    """Carries out plan file `plan_path` (`FILE[:ARG]`) in folder `root` with `launcher`
    ("local", "slurm" or "tpu"), its stages' command lines ending with `overrides`
    (`--config.FIELD=VALUE`); with `only`, just those stages and the ones they need. Writes
    ROOT/REPORT.md once the stages here are done (with slurm, the last job does).

    Raises:
      UserError: a plan that is not sound (one line says what).
      run.Stopped: a stage ended without its results file (rerun to resume).
    """
    the_plan = plan.load(plan_path)
    root = str(storage.at(root))
    stages = plan.select(plan.stages(the_plan, root, overrides), only)
    if launcher == "slurm":
        command = [
            "python",
            "-m",
            "vggjax.reproduce",
            f"--plan={plan_path}",
            f"--root={root}",
            *([f"--only={','.join(only)}"] if only else []),
            *overrides,
        ]
        launchers.slurm(stages, root, launcher_args, command, dry_run)
        return
    if launcher == "tpu":
        launchers.tpu(stages, root, launcher_args, dry_run)
    else:
        run.run_local(stages, root, dry_run)
    if not dry_run:
        report.write(the_plan, root, f"The paper's experiments: {plan_path}")
