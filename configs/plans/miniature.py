"""The paper's Tables 3–6 in miniature on the generated demo set: the same 12 training runs,
evaluations and fusions as configs/plans/paper.py, on configs/demo.py's recipe (nets A–E at 1/8
width, 64-pixel crops, S = 72, 112 and [72; 144], Q steps of 8) with a few hundred steps each.
Nothing is downloaded; on 2 CPU cores it finishes in under 30 minutes (README, "Reproducing the
paper").

    python -m vggjax.reproduce --plan=configs/plans/miniature.py --root=/tmp/vggjax-mini

Net A trains 800 steps of 32 images from scratch, B–E 400 from A, the S = 112 nets 200 from
S = 72, the jittered ones 200 from S = 112: enough for the grid's shape and its report, not for
the paper's conclusions.
"""

from vggjax.reproduce import paper

BUDGETS = {
    "scratch": {"num_train_steps": 800},
    "fixed": {"num_train_steps": 400},
    "large": {"num_train_steps": 200},
    "jittered": {"num_train_steps": 200},
}


def get_plan():
    return paper.small_grid(BUDGETS, dataset="demo")
