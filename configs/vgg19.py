"""VGG-19 (net E of Table 1) trained with the recipe of Sect. 3.1 (ImageNet, batch 256, SGD, 74 epochs).

Train at S = 256, then S = 384 from it, then multi-scale S ∈ [256, 512] from that (Sect. 3.1):

    python -m vggjax.main --config=configs/vgg19.py --workdir=runs/vgg19-256 --config.data_dir=~/tensorflow_datasets
    python -m vggjax.main --config=configs/vgg19.py:384 --workdir=runs/vgg19-384 --config.init_from=runs/vgg19-256
    python -m vggjax.main --config=configs/vgg19.py:256-512 --workdir=runs/vgg19-multi --config.init_from=runs/vgg19-384

Nets deeper than A may start, as in the paper, from a trained net A (first four convs and the
three FC layers copied): add --config.init_from=runs/vgg11-256 --config.kernel_init=normal to the
first command. Evaluate with the paper's protocols (Sect. 3.2): add --mode=eval to the same command.
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    return recipe.paper_recipe("E", scale)
