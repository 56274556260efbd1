"""The shallow net of Sect. 4.1 (net B with each pair of 3×3 convs as one 5×5), with the recipe of Sect. 3.1 (vggjax/recipe.py).

Train at S = 256 (Glorot init: its 5×5 convs cannot start from net A's 3×3 ones), then S = 384
and S ∈ [256, 512] from it; evaluate (Sect. 3.2):

    python -m vggjax.main --config=configs/vgg13_shallow.py --workdir=runs/vgg13_shallow
    python -m vggjax.main --config=configs/vgg13_shallow.py:384 --workdir=runs/vgg13_shallow-384 --config.init_from=runs/vgg13_shallow
    python -m vggjax.main --config=configs/vgg13_shallow.py:256-512 --workdir=runs/vgg13_shallow-multi --config.init_from=runs/vgg13_shallow-384
    python -m vggjax.main --config=configs/vgg13_shallow.py:256-512 --workdir=runs/vgg13_shallow-multi --mode=eval
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("B-shallow", scale)
