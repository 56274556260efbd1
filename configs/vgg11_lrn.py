"""VGG-11 with LRN (net A-LRN of Table 1), with the recipe of Sect. 3.1 (vggjax/recipe.py).

Train at S = 256, then S = 384 and S ∈ [256, 512] from it; evaluate (Sect. 3.2):

    python -m vggjax.main --config=configs/vgg11_lrn.py --workdir=runs/vgg11_lrn
    python -m vggjax.main --config=configs/vgg11_lrn.py:384 --workdir=runs/vgg11_lrn-384 --config.init_from=runs/vgg11_lrn
    python -m vggjax.main --config=configs/vgg11_lrn.py:256-512 --workdir=runs/vgg11_lrn-multi --config.init_from=runs/vgg11_lrn-384
    python -m vggjax.main --config=configs/vgg11_lrn.py:256-512 --workdir=runs/vgg11_lrn-multi --mode=eval
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("A-LRN", scale)
