"""VGG-16 with 1×1 convs (net C of Table 1), with the recipe of Sect. 3.1 (vggjax/recipe.py).

Train at S = 256 (Glorot init; or as the paper, from net A: add --config.init_from=runs/vgg11
--config.kernel_init=normal), then S = 384 and S ∈ [256, 512] from it; evaluate (Sect. 3.2):

    python -m vggjax.main --config=configs/vgg16_c.py --workdir=runs/vgg16_c
    python -m vggjax.main --config=configs/vgg16_c.py:384 --workdir=runs/vgg16_c-384 --config.init_from=runs/vgg16_c
    python -m vggjax.main --config=configs/vgg16_c.py:256-512 --workdir=runs/vgg16_c-multi --config.init_from=runs/vgg16_c-384
    python -m vggjax.main --config=configs/vgg16_c.py:256-512 --workdir=runs/vgg16_c-multi --mode=eval
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("C", scale)
