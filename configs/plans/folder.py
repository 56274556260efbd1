"""The paper's Tables 3–6 on any image folder (FOLDER/train/<class>/*, FOLDER/val/<class>/*),
with configs/plans/miniature.py's small nets and scales and budgets in epochs.

    python -m vggjax.data.stats --dataset=folder --data_dir=FOLDER   # its mean RGB, once
    python -m vggjax.reproduce --plan=configs/plans/folder.py:FOLDER --root=runs/FOLDER-grid \
        --config.mean_rgb="(R, G, B)"

The number of classes is FOLDER/train's. Net A trains 30 epochs from scratch, B–E 15 from A,
the S = 112 and jittered nets 8 each; override any field for every run with --config.FIELD.
"""

import os

from vggjax.errors import UserError
from vggjax.reproduce import paper

BUDGETS = {
    "scratch": {"num_epochs": 30},
    "fixed": {"num_epochs": 15},
    "large": {"num_epochs": 8},
    "jittered": {"num_epochs": 8},
}


def get_plan(folder: str = ""):
    if not folder:
        raise UserError("give the image folder: --plan=configs/plans/folder.py:FOLDER")
    folder = os.path.abspath(os.path.expanduser(folder))
    return paper.small_grid(BUDGETS, dataset="folder", data_dir=folder)
