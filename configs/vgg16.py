"""VGG-16 (net D of Table 1), with the recipe of Sect. 3.1 (vggjax/recipe.py).

Train at S = 256 (Glorot init; or as the paper, from net A: add --config.init_from=runs/vgg11
--config.kernel_init=normal), then S = 384 and S ∈ [256, 512] from it; evaluate (Sect. 3.2):

    python -m vggjax.main --config=configs/vgg16.py --workdir=runs/vgg16
    python -m vggjax.main --config=configs/vgg16.py:384 --workdir=runs/vgg16-384 --config.init_from=runs/vgg16
    python -m vggjax.main --config=configs/vgg16.py:256-512 --workdir=runs/vgg16-multi --config.init_from=runs/vgg16-384
    python -m vggjax.main --config=configs/vgg16.py:256-512 --workdir=runs/vgg16-multi --mode=eval
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("D", scale)
