"""Fine-tuning a pre-trained VGG on your own images (`DATA/train/<class>/*`, `DATA/val/<class>/*`).

The net (Table 1 column, widths, crop, mean RGB) is the checkpoint's: weights converted with
vggjax.convert or a vggjax training run. Every layer but fc8 starts from it; fc8 is new, sized
for your classes (as many as DATA/train holds). All layers train, at a tenth of the paper's
learning rate:

    python -m vggjax.convert --from=keras vgg16 --output=ckpt/vgg16   # fetched by name
    python -m vggjax.main --config=configs/finetune.py --workdir=runs/flowers \\
        --config.init_from=ckpt/vgg16 --config.data_dir=DATA

Train the FC layers only (the conv layers stay as converted): add --config.trainable=fc; the
new last layer only (a linear probe): --config.trainable=fc8. From a checkpoint without the top
(Keras's _notop files): --config.init_layers=conv. Evaluate with the paper's protocols: the same
command with --mode=eval.
"""

import ml_collections

from vggjax import recipe


def get_config():
    c = recipe.paper_recipe("", "256")
    c.kernel_init = "glorot"  # for the new layers
    c.init_layers = "all_but_fc8"
    c.trainable = "all"
    c.dataset = "folder"
    c.num_classes = ml_collections.config_dict.placeholder(int)  # DATA/train's (vggjax.main)
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.num_epochs = 20
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50
    return c
