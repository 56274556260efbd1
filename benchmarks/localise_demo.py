"""The README's localisation figures on the demo set (Appendix A), measured from nothing.

    python benchmarks/localise_demo.py --workdir=/tmp/loc-demo     # 23 min on 2 shared cores

Runs the README's commands, each in a process of its own (`python -m vggjax.main`), one after
the other, in subfolders of `--workdir` (which must be new or empty):

- C: `configs/demo.py`, the classifier (its results.json: top-1 error at Q = eval_scale);
- pcr: `configs/demo_loc.py --config.init_from=C` trained, then `--mode=eval`: Table 8's
  ground-truth-class error and Table 9's top-5 localisation error;
- scr: the same with `--config.objective=scr`;
- fusion: `--mode=eval` of the union of the two nets' boxes (`--config.loc.checkpoints`);
- baseline: no net: a box of the training boxes' mean size (as fractions of the image's sides),
  centred in each validation image; the share with IoU ≤ 0.5 with every ground-truth box;
- pcr96 (unless --noscale96): pcr trained 20 epochs at S = Q = 96 instead of 64, the setting
  configs/demo_loc.py says it was chosen over.

`--classifier=RUN` skips training C and uses that run. `--set=FIELD=VALUE` (repeatable) is given
to every command as `--config.FIELD=VALUE` (e.g. `--set=num_train_steps=20` for a quick try).
Prints a line per step as it ends and, last, one JSON line: every figure, the date and the host.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags

from vggjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A new or empty folder for the runs.")
_CLASSIFIER = flags.DEFINE_string("classifier", "", "A trained configs/demo.py run to use as C.")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE given to every command as --config.")
_SCALE96 = flags.DEFINE_bool("scale96", True, "Also train and test pcr at S = Q = 96.")
flags.mark_flag_as_required("workdir")

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_S96 = ("train_scale=(96,96)", "eval_scale=96", "loc.scales=(96,)", "num_epochs=20")


def _main(config: str, workdir: pathlib.Path, *fields: str, mode: str = "train") -> float:
    """`python -m vggjax.main` with `fields` (and --set's) as --config.FIELD=VALUE; its log in
    WORKDIR.log (the folder's name); returns its seconds."""
    fields = (*fields, *_SET.value)
    cmd = [sys.executable, "-m", "vggjax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--mode={mode}", *(f"--config.{f}" for f in fields)]
    start = time.monotonic()
    with open(f"{workdir}.{mode}.log", "w") as log:
        done = subprocess.run(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {workdir}.{mode}.log")
    return round(time.monotonic() - start, 1)


def _json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _rows(results: dict[str, Any], protocol: str, error: str) -> list[float]:
    return [round(r[error], 4) for r in results["results"] if r["protocol"] == protocol]


def localisation_net(name: str, root: pathlib.Path, classifier: str, *fields: str) -> dict:
    """A localisation net trained from the classifier and tested by both protocols."""
    workdir = root / name
    fields = (f"init_from={classifier}", *fields)
    train_s = _main("configs/demo_loc.py", workdir, *fields)
    eval_s = _main("configs/demo_loc.py", workdir, *fields, mode="eval")
    trained, tested = _json(workdir / "results.json"), _json(workdir / "localisation_results.json")
    return dict(
        train_seconds=train_s,
        steps=trained["step"],
        batch_size=_json(workdir / "config.json")["batch_size"],
        gt_class_error=_rows(tested, "gt_class", "gt_class_error")[0],
        top5_error=_rows(tested, "top5", "top5_error")[0],
        eval_seconds=eval_s,
        eval_seconds_in_run=tested["seconds"],
        images=tested["images"],
    )


def fusion(root: pathlib.Path, classifier: str, nets: tuple[str, ...]) -> dict:
    """Table 9's fusion row: the union of the nets' boxes, merged."""
    paths = ", ".join(f"'{root / net}'" for net in nets)
    fields = (f"init_from={classifier}", f"loc.checkpoints=({paths})")
    seconds = _main("configs/demo_loc.py", root / "fusion", *fields, mode="eval")
    tested = _json(root / "fusion" / "localisation_results.json")
    return dict(
        nets=list(nets), top5_error=_rows(tested, "top5", "top5_error")[-1], seconds=seconds
    )


def centred_box_error(data_dir: str) -> dict:
    """The share of validation images whose ground truth a centred box of the training boxes'
    mean size (fractions of the image's sides) misses (IoU ≤ 0.5 with each box)."""
    from vggjax import localise
    from vggjax.data import boxes

    config = _demo_loc_config(data_dir)
    train, val = boxes.boxed_source(config, "train"), boxes.boxed_source(config, "val")
    found = np.concatenate([train.truth(i) for i in range(len(train))])
    w, h = np.mean(found[:, 2] - found[:, 0]), np.mean(found[:, 3] - found[:, 1])
    box = np.array([0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2])
    missed = [not localise.localised(box, val.truth(i)) for i in range(len(val))]
    return dict(
        error=float(np.mean(missed)), box=[round(float(x), 4) for x in box], images=len(val)
    )


def _demo_loc_config(data_dir: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_loc", _ROOT / "configs" / "demo_loc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data_dir = data_dir
    return config


def host() -> dict:
    """Where and when: the figures depend on the machine and on what else ran on it."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [x for x in f if x.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else ""
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        cpu=cpu or platform.processor(),
        cores=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )


def _report(name: str, figures: dict) -> None:
    print(f"{name}: {json.dumps(figures)}", flush=True)


def main(argv: list[str]) -> None:
    del argv
    root = pathlib.Path(_WORKDIR.value).resolve()
    if root.exists() and any(root.iterdir()):
        sys.exit(f"--workdir {root} is not empty: the timings are of fresh runs")
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = dict(start=host(), set=_SET.value)
    _report("start", out["start"])
    classifier = _CLASSIFIER.value or str(root / "C")
    if not _CLASSIFIER.value:
        seconds = _main("configs/demo.py", root / "C")
        out["C"] = dict(
            train_seconds=seconds, top1_error=_json(root / "C/results.json")["top1_error"]
        )
        _report("C", out["C"])
    for name, fields in (("pcr", ()), ("scr", ("objective=scr",))):
        out[name] = localisation_net(name, root, classifier, *fields)
        _report(name, out[name])
    out["fusion"] = fusion(root, classifier, ("pcr", "scr"))
    _report("fusion", out["fusion"])
    data_dir = _json(root / "pcr" / "config.json").get("data_dir", "")
    out["baseline"] = centred_box_error(data_dir)
    _report("baseline", out["baseline"])
    if _SCALE96.value:
        out["pcr96"] = localisation_net("pcr96", root, classifier, *_S96)
        _report("pcr96", out["pcr96"])
    out["end"] = host()
    print(json.dumps(out))


if __name__ == "__main__":
    cli.run("localise_demo", app.run, main)  # as every vggjax command line runs: tune_cpu first
