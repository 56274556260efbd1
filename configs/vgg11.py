"""VGG-11 (net A of Table 1), with the recipe of Sect. 3.1 (vggjax/recipe.py).

Train at S = 256, then S = 384 and S ∈ [256, 512] from it; evaluate (Sect. 3.2):

    python -m vggjax.main --config=configs/vgg11.py --workdir=runs/vgg11
    python -m vggjax.main --config=configs/vgg11.py:384 --workdir=runs/vgg11-384 --config.init_from=runs/vgg11
    python -m vggjax.main --config=configs/vgg11.py:256-512 --workdir=runs/vgg11-multi --config.init_from=runs/vgg11-384
    python -m vggjax.main --config=configs/vgg11.py:256-512 --workdir=runs/vgg11-multi --mode=eval
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("A", scale)
