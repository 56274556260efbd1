"""Appendix B: very deep features and linear SVMs on an image folder, with the Caltech-101
protocol: Net-D and Net-E stacked, Q ∈ {256, 384, 512} stacked, 3 random splits of the images in
`DATA/train/<class>/*` into 30 training and up to 50 test images per class, C chosen on 20% of
each split's training images; mean class recall ± std over the splits.

    python -m vggjax.convert --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 --model=D --output=ckpt/vgg16
    python -m vggjax.convert --from=keras vgg19_weights_tf_dim_ordering_tf_kernels.h5 --model=E --output=ckpt/vgg19
    python -m vggjax.main --config=configs/transfer.py --workdir=runs/caltech101 --mode=transfer \\
        --config.data_dir=DATA --config.features.checkpoints="('ckpt/vgg16', 'ckpt/vgg19')"

Caltech-256: --config.transfer.train_per_class=60 --config.transfer.test_per_class=100000 (the
rest). A fixed split (`DATA/val/<class>/*` for testing): --config.transfer.random_splits=0.
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
    c.transfer.random_splits = 3
    c.transfer.train_per_class = 30
    c.transfer.test_per_class = 50
    c.eval.batch_size = 32
    return c
