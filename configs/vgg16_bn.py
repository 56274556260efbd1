"""VGG-16 with batch norm (net D with batch norm after each conv, torchvision's vgg16_bn), with the recipe of Sect. 3.1 (vggjax/recipe.py).

Train at S = 256, then S = 384 and S ∈ [256, 512] from it; evaluate (Sect. 3.2):

    python -m vggjax.main --config=configs/vgg16_bn.py --workdir=runs/vgg16_bn
    python -m vggjax.main --config=configs/vgg16_bn.py:384 --workdir=runs/vgg16_bn-384 --config.init_from=runs/vgg16_bn
    python -m vggjax.main --config=configs/vgg16_bn.py:256-512 --workdir=runs/vgg16_bn-multi --config.init_from=runs/vgg16_bn-384
    python -m vggjax.main --config=configs/vgg16_bn.py:256-512 --workdir=runs/vgg16_bn-multi --mode=eval
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("vgg16_bn", scale)
