"""VGG for data sets of small images (about 32 pixels: MNIST, CIFAR, SVHN), as a folder
DATA_DIR/{train,val}/<class>/<image files>, in a fixed budget on a CPU:

    python -m vggjax.main --config=configs/small_images.py:DATA_DIR --workdir=/tmp/small
    python -m vggjax.main --config=configs/small_images.py --config.data_dir=DATA_DIR --workdir=...

(MNIST as such a folder: README.md, Small images.) Set --config.mean_rgb to the data set's own
(`python -m vggjax.data.stats --dataset=folder --data_dir=DATA_DIR`; MNIST's is set) and, for
colour photos whose mirror is the same class (CIFAR), --config.random_flip=True.

What published VGG-on-small-images recipes do, and where each choice comes from:

- The net: VGG-11 with batch norm after every conv (torchvision's vgg11_bn; kuangliu/pytorch-cifar
  and chengyangfu/pytorch-vgg-cifar10 train VGG with batch norm on 32-pixel CIFAR), at a quarter of
  the width (16 to 128 channels) with FC layers 256 wide and no dropout (kuangliu's VGG has a
  single linear classifier and no dropout): 30 epochs of MNIST train in about 14
  minutes on 2 CPU cores (about 55 ms a step of 128). He-style init, as chengyangfu's VGG
  (normal, sqrt(2/n)) and the MNIST VGG of kkweon/mnist-competition and SpinalNet.
- Images rescaled to S = 32 (MNIST's 28-pixel digits: 32 is the smallest side five 2x2 poolings
  take), crops of 32 from the image padded by 4 pixels of zeros on each side
  (`crop_padding`: kuangliu's and chengyangfu's RandomCrop(32, padding=4)); no flips (digits are
  not mirror-symmetric) and no colour shift (grey images); test on the centre crop at Q = 32.
- SGD with momentum 0.9 and weight decay 5e-4 (kuangliu, chengyangfu), batch 128, learning rate
  0.1 (kuangliu's with batch norm; chengyangfu's 0.05) warmed up linearly over the first epoch
  (Goyal et al. 2017's warm-up for a large rate) then decayed to 0 on a cosine (kuangliu's
  CosineAnnealingLR) over a fixed budget of 30 epochs instead of the paper's plateau cuts, which
  need an unknown number of epochs. 10 epochs fell 7 images short of the figure below, and 20
  landed on it give or take the few images each version's rounding moves (next paragraph).
- No label smoothing: not in these recipes, and not needed on MNIST.
- The images decoded once and held in memory (`data_in_memory`: what torchvision's MNIST and
  CIFAR data sets do), the batches those of the folder pipeline.

Published figure to reach on MNIST (its 10,000 test images as `val`): 99.63% test accuracy for
the smaller "VggNet5" of kkweon/mnist-competition (README, Performance; 99.71% for its larger
VGG), the VGG-5 that SpinalNet (Kabir et al. 2020, arXiv 2007.03347) builds on
(`published_accuracy`). Measured as it ships on MNIST as a folder, alone on the 2-core Xeon
(2026-12-06, `benchmarks/time_to_accuracy.py`): **99.62%** after 30 epochs, one test image under
the figure, having passed it at epoch 28 (99.65%), in 801 s of training (decoding and compiling
included) plus 48 s of validation passes; the version before, whose conv1_1 rounded differently,
ended at 99.68% (past the figure from epoch 25 on), and 40 epochs of this one at 99.63% (99.64-
99.68% from epoch 32 to 37). With 20 epochs, four runs as vggjax's step got faster ended at
99.64%, 99.67%, 99.60% and 99.61%; with 10 (shared machine), 99.56%. So the recipe lands on the
published figure, give or take the few images each version's rounding moves, not reliably above it.

Dense evaluation (`--mode=eval`; `benchmarks/dense_alignment.py`) of the 20-epoch net, top-1 test
error (%) at Q = 32, 36, 40 and multi-scale: "top_left" (the paper's) 0.36, 0.45, 1.10, 0.39;
"centred" 0.36, 0.36, 0.59, 0.37, hence `eval.dense_alignment`. Without `eval.flip=False` the
mirror's posteriors, of digits never trained mirrored, made it 2.18% at Q = 32.
"""

from vggjax import recipe


def get_config(data_dir: str = ""):
    c = recipe.paper_recipe("vgg11_bn", "32")
    c.dataset, c.data_dir = "folder", data_dir
    c.num_classes = 10
    c.width, c.fc_width, c.dropout_rate = 0.25, 256, 0.0
    c.crop_size, c.kernel_init = 32, "he"
    c.mean_rgb = (33.32, 33.32, 33.32)  # MNIST's (0.1307 on the 0-1 scale, as torchvision's)
    c.colour_shift_std, c.random_flip, c.crop_padding = 0.0, False, 4
    c.data_in_memory, c.num_workers = True, 0
    c.batch_size, c.num_epochs = 128, 30
    c.lr_schedule, c.learning_rate, c.warmup_epochs = "cosine", 0.1, 1.0
    c.momentum, c.weight_decay = 0.9, 5e-4
    c.eval_every_steps = c.checkpoint_every_steps = 468  # an epoch of MNIST: 60,000 // 128
    c.log_every_steps = 50
    c.eval_scale = 32
    c.eval.scales = (32, 36, 40)
    c.eval.flip = c.random_flip  # the mirror's posteriors only where mirrors were trained on
    c.eval.dense_alignment = "centred"  # docstring: on 28-pixel images rescaled to Q = 36, 40
    c.eval.batch_size = 128
    # MNIST's published VGG figure (docstring): benchmarks/time_to_accuracy.py's default target.
    c.published_accuracy = 0.9963
    return c
