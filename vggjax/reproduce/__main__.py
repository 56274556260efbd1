"""`python -m vggjax.reproduce --plan=PLAN --root=DIR [--launcher=local|slurm|tpu]
[--config.FIELD=VALUE ...]`: a plan's stages, then DIR/REPORT.md (`vggjax.reproduce`)."""

from __future__ import annotations

import re
import shlex
from typing import Any

from absl import app, flags, logging

from vggjax import cli, reproduce
from vggjax.errors import UserError
from vggjax.reproduce import run

FLAGS = flags.FlagValues()  # reproduce's own, not absl's global registry (cli.parse_flags)
_PLAN = flags.DEFINE_string(
    "plan", None, "A plan file, FILE[:ARG], e.g. configs/plans/miniature.py.", flag_values=FLAGS
)
_ROOT = flags.DEFINE_string(
    "root", None, "Folder of the plan's runs, evaluations and REPORT.md.", flag_values=FLAGS
)
_LAUNCHER = flags.DEFINE_enum(
    "launcher",
    "local",
    ["local", "slurm", "tpu"],
    "local: the stages one after another here; slurm: as jobs through launch/slurm_gpu.sh; "
    "tpu: one after another on a slice through launch/tpu_pod.sh.",
    flag_values=FLAGS,
)
_LAUNCHER_ARGS = flags.DEFINE_string(
    "launcher_args",
    "",
    "Options for the launcher, e.g. \"--nodes=2 --gpus-per-node=8 --setup='...'\" or "
    '"--name=pod --zone=us-central2-b --accelerator=v4-32".',
    flag_values=FLAGS,
)
_ONLY = flags.DEFINE_list(
    "only", [], "Just these stages (e.g. evals/D-256) and the ones they need.", flag_values=FLAGS
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the commands instead of running them.", flag_values=FLAGS
)

_OVERRIDE = re.compile(r"--(no)?config\.[^=]+(=.*)?$")


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """reproduce's flags as `vggjax.reproduce.reproduce`'s arguments; the `--config.FIELD=VALUE`
    left are for every net's command line."""
    FLAGS.unparse_flags()  # each call on its own (tests parse several command lines)
    rest = cli.parse_flags(argv, FLAGS, known_only=True)
    others = [arg for arg in rest[1:] if not _OVERRIDE.match(arg)]
    if others:
        raise UserError(
            f"unknown flag {others[0]}; besides its own, reproduce takes --config.FIELD=VALUE"
        )
    for name, flag in (("plan", _PLAN), ("root", _ROOT)):
        if not flag.value:
            raise UserError(f"--{name} is required")
    return dict(
        plan_path=_PLAN.value,
        root=_ROOT.value,
        launcher=_LAUNCHER.value,
        launcher_args=shlex.split(_LAUNCHER_ARGS.value),
        overrides=rest[1:],
        only=_ONLY.value,
        dry_run=_DRY_RUN.value,
    )


def _main(arguments: dict[str, Any]) -> None:
    logging.set_verbosity(logging.INFO)
    try:
        reproduce.reproduce(**arguments)
    except run.Stopped as e:
        cli.fail("vggjax.reproduce", str(e), status=1)


if __name__ == "__main__":
    cli.run("vggjax.reproduce", app.run, _main, flags_parser=parse_flags)
