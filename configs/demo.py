"""A narrow VGG (net A's shape, 1/8 of its width) on the generated demo set: the whole recipe,
scaled down to finish in minutes on a laptop CPU with nothing downloaded.

    python -m vggjax.main --config=configs/demo.py --workdir=/tmp/vggjax-demo
"""

from vggjax import recipe


def get_config():
    c = recipe.paper_recipe("vgg11_bn", "72-104")
    c.dataset = "demo"
    c.num_classes = 10
    c.width = 0.125
    c.fc_width = 128
    c.crop_size = 64
    c.kernel_init = "glorot"
    c.mean_rgb = (128.0, 128.0, 128.0)
    c.num_workers = 2
    c.batch_size = 64
    c.num_epochs = 40
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.log_every_steps = 20
    c.eval.scales = (72, 88, 104)
    c.eval.batch_size = 64
    return c
