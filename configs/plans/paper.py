"""The paper's Tables 3–6 at full scale on ImageNet (Sect. 4.1–4.4): 12 training runs, their
evaluations and the fusions of Table 6, then ROOT/REPORT.md beside the paper's numbers.

    python -m vggjax.reproduce --plan=configs/plans/paper.py --root=runs/paper \
        --config.data_dir=~/tensorflow_datasets [--launcher=slurm|tpu --launcher_args="..."]

Net A (and A-LRN) trains from N(0, 1e-2) at S = 256; B–E start from A's first four conv and
three FC layers (Sect. 3.1), with N(0, 1e-2) for the rest; S = 384 is fine-tuned from the
S = 256 net at learning rate 1e-3 and S ∈ [256; 512] from the S = 384 net (configs/*.py:384
and :256-512). Each net is tested densely at Q = S (Table 3) and at three Q (Table 4), D and E
also with 150 crops and both (Table 5); Table 6 fuses nets. `paper.py:glorot` starts B–E from
Glorot's initialisation instead (the paper's later finding): they then need not wait for A.
"""

from vggjax.errors import UserError
from vggjax.reproduce import paper

FILES = {
    "A": "vgg11",
    "A-LRN": "vgg11_lrn",
    "B": "vgg13",
    "C": "vgg16_c",
    "D": "vgg16",
    "E": "vgg19",
}


def get_plan(init: str = "net_a"):
    if init not in ("net_a", "glorot"):
        raise UserError(f"configs/plans/paper.py takes net_a or glorot, not {init!r}")

    def recipe(net, kind, scale):
        config = f"configs/{FILES[net]}.py:{paper.scale_label(scale)}"
        from_a = init == "net_a" and kind == "fixed" and net not in paper.SCRATCH
        return config, {"kernel_init": "normal"} if from_a else {}

    return paper.grid(recipe, from_net_a=init == "net_a")
