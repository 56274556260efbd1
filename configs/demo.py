"""A narrow VGG on the generated demo set: the paper's recipe scaled down to finish in a few
minutes on a laptop CPU, with nothing downloaded.

    python -m vggjax.main --config=configs/demo.py --workdir=/tmp/vggjax-demo

What is scaled down: the net (VGG-11's shape at 1/8 width, FC layers 128 wide), the crop (64)
and scales (S ∈ [72, 104], Q ∈ {72, 88, 104}), the batch (64) and the budget (40 epochs of
2,000 images). What is kept: SGD with momentum 0.9, weight decay 5e-4, learning rate 1e-2 cut
on plateau, scale jittering, random crops, flips and the RGB colour shift. Two departures, both
because the FC layers are 32× narrower than the paper's: batch norm after each conv (torchvision's
vgg11_bn) and no dropout — with dropout 0.5 on 128 units the net stayed at chance for 800 steps.
"""

from vggjax import recipe


def get_config():
    c = recipe.on_demo_set(recipe.paper_recipe("vgg11_bn", "72-104"))
    c.width = 0.125
    c.fc_width = 128
    c.mean_rgb = (126.653, 128.350, 128.137)  # python -m vggjax.data.stats --dataset=demo
    return c
