"""The paper's training and testing recipe (Sect. 3) as one ConfigDict, shared by configs/*.py.

Every field can be overridden on the command line (`--config.batch_size=128`); the values each
field allows are in `vggjax/options.py` (the net's, in `models.ModelSpec`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from vggjax import models
from vggjax.errors import UserError

# Mean RGB of the ILSVRC-2012 training set on the 0–255 scale (Sect. 2.1's only pre-processing).
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

# How a training scale is named after the colon in `--config=configs/vgg16.py:SCALE`.
SCALES = {"256": (256, 256), "384": (384, 384), "256-512": (256, 512)}


def eval_scales_for(train_scale: tuple[int, int]) -> tuple[int, ...]:
    """Sect. 4.2: {S−32, S, S+32} for a fixed S; {S_min, (S_min+S_max)/2, S_max} for jittered S."""
    s_min, s_max = train_scale
    if s_min == s_max:
        return (s_min - 32, s_min, s_min + 32)
    return (s_min, (s_min + s_max) // 2, s_max)


def parse_scale(scale: str) -> tuple[int, int]:
    """ "256", "384" or "256-512" (or any "S" / "SMIN-SMAX") as (S_min, S_max)."""
    try:
        parts = tuple(int(p) for p in scale.split("-"))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 2) or not 0 < parts[0] <= parts[-1]:
        raise UserError(
            f"training scale must be S or SMIN-SMAX (e.g. 256, 384, 256-512), got {scale!r}"
        )
    return parts[0], parts[-1]


def paper_recipe(model: str, scale: str = "256") -> ml_collections.ConfigDict:
    """Sect. 3.1's recipe for `model` trained at scale S (fixed) or S ∈ [S_min, S_max]."""
    c = ml_collections.ConfigDict()
    train_scale = parse_scale(scale)

    # The net (Table 1): every field of models.ModelSpec at its default (what each means and
    # allows is said there), for `model`.
    for field in dataclasses.fields(models.ModelSpec):
        c[field.name] = field.default
    c.model = model
    # "normal" is the paper's N(0, 1e-2); deeper nets then start from net A (init_from).
    # "glorot" is the paper's later finding that needs no pre-training.
    c.kernel_init = "normal" if model in ("A", "A-LRN", "vgg11", "vgg11_lrn") else "glorot"

    # Data (Sect. 3.1: isotropic rescale to S, random crop, flip, RGB colour shift).
    c.dataset = "imagenet2012"  # one of options.DATASETS
    c.data_dir = ""
    c.num_workers = 8  # grain worker processes per host decoding and augmenting
    c.train_scale = train_scale  # (S_min, S_max); equal for single-scale training
    c.mean_rgb = IMAGENET_MEAN_RGB
    c.colour_shift_std = 0.1
    c.random_flip = True  # off for images whose mirror is another class (digits)
    # > 0: crops may reach this many pixels past the rescaled image's edges (zeros there): the
    # padding-and-crop of small-image recipes (CIFAR, MNIST).
    c.crop_padding = 0
    # True: each split decoded once into arrays held in memory (cached in data_cache_dir, by
    # default ~/.cache/vggjax/arrays), the same batches as from files (vggjax/data/arrays.py).
    c.data_in_memory = False
    c.data_cache_dir = ""

    # Optimisation (Sect. 3.1).
    c.batch_size = 256  # global, over all devices and hosts
    c.num_epochs = 74
    c.num_train_steps = -1  # > 0 replaces the epoch budget
    c.learning_rate = 1e-2
    c.momentum = 0.9
    c.weight_decay = 5e-4  # L2 penalty multiplier on the kernels
    c.weight_decay_biases = False  # Caffe's VGG recipe: biases carry no weight decay
    # One of options.LR_SCHEDULES: the paper's rate cut on plateau, or a fixed budget's linear
    # warm-up over warmup_epochs then cosine or linear decay to 0 at the last step.
    c.lr_schedule = "plateau"
    c.warmup_epochs = 0.0
    c.lr_drop_factor = (
        0.1  # "decreased by a factor of 10 when validation accuracy stopped improving"
    )
    c.max_lr_drops = 3  # "in total, the learning rate was decreased 3 times"
    c.plateau_patience = 2  # validation passes without improvement before a drop
    c.eval_every_steps = 5000  # validation passes that drive the plateau schedule
    c.eval_scale = train_scale[0] + (train_scale[1] - train_scale[0]) // 2  # Q of Sect. 4.1

    # Initialisation from another checkpoint (Sect. 3.1): a trained net A for deeper nets
    # (first four convs and the three FC layers), or the S=256 net for S=384 and so on.
    # Fine-tuning: a new last layer (all_but_fc8), a checkpoint without the top (conv), and
    # training some layers only (`trainable`). model "" takes the net (Table 1 column, widths,
    # crop, mean RGB) from init_from's config.json.
    c.init_from = ""
    c.init_layers = "net_a"  # one of options.INIT_LAYERS
    # One of options.TRAINABLE: the layers SGD updates; the others stay as initialised.
    c.trainable = "all"
    if scale in ("384", "256-512"):
        # S=384 starts from the S=256 net with learning rate 1e-3; multi-scale starts from S=384
        # (the paper gives no rate for it: we keep 1e-3).
        c.init_layers = "all"
        c.learning_rate = 1e-3

    # Checkpoints and logging.
    c.checkpoint_every_steps = 2000
    c.max_to_keep = 3
    c.log_every_steps = 100
    c.seed = 0
    # (FIRST, LAST): a jax.profiler trace of train steps FIRST to LAST in WORKDIR/profile (for
    # TensorBoard's profile tab or XProf); () for none.
    c.profile_steps = ()

    # Testing (Sect. 3.2, 4.2–4.4).
    c.eval = ml_collections.ConfigDict()
    c.eval.scales = eval_scales_for(train_scale)  # Q
    # Any of options.EVAL_PROTOCOLS (vggjax/evaluators/classification.py computes each).
    c.eval.protocols = ("dense", "multi_scale_dense")
    c.eval.flip = True
    c.eval.dense_alignment = "top_left"  # one of options.DENSE_ALIGNMENTS
    c.eval.batch_size = 32
    c.eval.checkpoints = ()  # empty: the workdir's latest checkpoint; several: fusion (Sect. 4.4)
    c.eval.bucket_multiple = 32  # images are padded to sides that are multiples of this
    # ... whose step doubles with each octave of side past 8 × 32 = 256: fewer buckets (and
    # programs to compile) at large Q; 4 halves them again for at most 25% padding a side.
    c.eval.buckets_per_octave = 8

    # Features for other data sets (Appendix B): --mode=features, --mode=transfer.
    c.features = ml_collections.ConfigDict()
    c.features.checkpoints = ()  # empty: the workdir's; two: their descriptors stacked
    c.features.scales = (256, 384, 512)  # Q
    c.features.aggregation = "stack"  # over Q: "stack" (the paper's Caltech) or "average" (VOC)
    c.features.flip = True
    c.features.dense_alignment = "top_left"  # one of options.DENSE_ALIGNMENTS, as eval's
    c.features.splits = ("train", "val")
    c.transfer = ml_collections.ConfigDict()
    c.transfer.c_values = (
        0.01,
        0.1,
        1.0,
        10.0,
        100.0,
        1000.0,
    )  # the SVM's C, chosen on held-out images
    c.transfer.validation_fraction = 0.2  # of the training images, per class
    # > 0: the Caltech protocol on the 'train' folder alone: this many random splits into
    # train_per_class training and up to test_per_class test images per class ('val' unused).
    c.transfer.random_splits = 0
    c.transfer.train_per_class = 30
    c.transfer.test_per_class = 50

    # Localisation (Appendix A), for objective "scr" or "pcr": --mode=eval runs the protocols.
    c.loc = ml_collections.ConfigDict()
    c.loc.annotations = ""  # imagenet2012: the unpacked ILSVRC bounding-box XML files
    c.loc.protocols = ("gt_class", "top5")  # Table 8's and Table 9's (options.LOC_PROTOCOLS)
    c.loc.scales = (c.eval_scale,)  # Q of the dense protocol (Table 9: S, or 352 and 384)
    c.loc.classifier = ""  # the classification run giving the top-5 classes; "": init_from
    c.loc.checkpoints = ()  # empty: the workdir's; several: the union of their boxes (Table 9)
    c.loc.merge_iou = 0.5  # greedy merging joins boxes while the closest pair has this IoU
    c.loc.max_aspect = 3.0  # boxes kept per image and Q: the map of an image this elongated
    # Training scr or pcr needs init_from (Sect. A.1: a classification run); True starts from
    # random weights instead, against the paper (options.check_start).
    c.loc.from_scratch = False
    return c


def on_demo_set(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` run on the generated demo set in minutes on a laptop CPU: its 10 classes, 64-pixel
    crops, Q ∈ {72, 88, 104}, batch 64, 40 epochs, Glorot init and no dropout (configs/demo.py
    says why), shared by configs/demo.py and demo_loc.py."""
    c.dataset = "demo"
    c.num_classes = 10
    c.crop_size = 64
    c.kernel_init = "glorot"
    c.dropout_rate = 0.0
    c.num_workers = 2
    c.batch_size = 64
    c.num_epochs = 40
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.log_every_steps = 20
    c.eval.scales = (72, 88, 104)
    c.eval.batch_size = 64
    return c
