"""Appendix B: very deep features and linear SVMs on an image folder (`DATA/train/<class>/*`,
`DATA/val/<class>/*`), with the Caltech protocol's settings: Net-D and Net-E, Q ∈ {256, 384, 512}
stacked, C chosen on 20% of the training images.

    python -m vggjax.convert --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 --model=D --output=ckpt/vgg16
    python -m vggjax.convert --from=keras vgg19_weights_tf_dim_ordering_tf_kernels.h5 --model=E --output=ckpt/vgg19
    python -m vggjax.main --config=configs/transfer.py --workdir=runs/caltech101 --mode=transfer \\
        --config.data_dir=DATA --config.features.checkpoints="('ckpt/vgg16', 'ckpt/vgg19')"

--mode=features writes the descriptors only. VOC's setting: --config.features.aggregation=average
--config.features.scales="(256, 384, 512, 640, 768)".
"""

from vggjax import recipe


def get_config():
    c = recipe.paper_recipe("D")  # the net itself comes from each checkpoint's config.json
    c.dataset = "folder"
    c.features.checkpoints = ("ckpt/vgg16", "ckpt/vgg19")
    c.features.scales = (256, 384, 512)
    c.features.aggregation = "stack"
    c.eval.batch_size = 32
    return c
