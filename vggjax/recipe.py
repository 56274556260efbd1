"""The paper's training and testing recipe (Sect. 3) as one ConfigDict, shared by configs/*.py.

Every field can be overridden on the command line (`--config.batch_size=128`).
"""

from __future__ import annotations

import functools

import ml_collections

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
        raise ValueError(
            f"training scale must be S or SMIN-SMAX (e.g. 256, 384, 256-512), got {scale!r}"
        )
    return parts[0], parts[-1]


def paper_recipe(model: str, scale: str = "256") -> ml_collections.ConfigDict:
    """Sect. 3.1's recipe for `model` trained at scale S (fixed) or S ∈ [S_min, S_max]."""
    c = ml_collections.ConfigDict()
    train_scale = parse_scale(scale)

    # Model (Table 1).
    c.model = model
    c.num_classes = 1000
    c.width = 1.0  # channel multiplier; narrow nets of the same shape for tests and the demo
    c.fc_width = 4096
    c.crop_size = 224
    c.dropout_rate = 0.5
    # "normal" is the paper's N(0, 1e-2); deeper nets then start from net A (init_from).
    # "glorot" is the paper's later finding that needs no pre-training.
    c.kernel_init = "normal" if model in ("A", "A-LRN", "vgg11", "vgg11_lrn") else "glorot"
    c.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters

    # Data (Sect. 3.1: isotropic rescale to S, random crop, flip, RGB colour shift).
    c.dataset = "imagenet2012"  # imagenet2012 | folder | demo
    c.data_dir = ""
    c.num_workers = 8  # grain worker processes per host decoding and augmenting
    c.train_scale = train_scale  # (S_min, S_max); equal for single-scale training
    c.mean_rgb = IMAGENET_MEAN_RGB
    c.colour_shift_std = 0.1

    # Optimisation (Sect. 3.1).
    c.batch_size = 256  # global, over all devices and hosts
    c.num_epochs = 74
    c.num_train_steps = -1  # > 0 replaces the epoch budget
    c.learning_rate = 1e-2
    c.momentum = 0.9
    c.weight_decay = 5e-4  # L2 penalty multiplier on the kernels
    c.weight_decay_biases = False  # Caffe's VGG recipe: biases carry no weight decay
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
    c.init_layers = "net_a"  # one of INIT_LAYERS
    c.trainable = "all"  # one of TRAINABLE: the layers SGD updates; the others stay as initialised
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

    # Testing (Sect. 3.2, 4.2–4.4).
    c.eval = ml_collections.ConfigDict()
    c.eval.scales = eval_scales_for(train_scale)  # Q
    # Any of EVAL_PROTOCOLS (vggjax/evaluate.py says what each computes).
    c.eval.protocols = ("dense", "multi_scale_dense")
    c.eval.flip = True
    c.eval.batch_size = 32
    c.eval.checkpoints = ()  # empty: the workdir's latest checkpoint; several: fusion (Sect. 4.4)
    c.eval.bucket_multiple = 32  # images are padded to sides that are multiples of this

    # Features for other data sets (Appendix B): --mode=features, --mode=transfer.
    c.features = ml_collections.ConfigDict()
    c.features.checkpoints = ()  # empty: the workdir's; two: their descriptors stacked
    c.features.scales = (256, 384, 512)  # Q
    c.features.aggregation = "stack"  # over Q: "stack" (the paper's Caltech) or "average" (VOC)
    c.features.flip = True
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
    return c


DATASETS = ("imagenet2012", "folder", "demo")
EVAL_PROTOCOLS = (
    "dense",
    "multi_scale_dense",
    "multi_crop",
    "multi_crop_dense",
    "centre_crop",
    "fusion",
)
DTYPES = ("float32", "bfloat16")
AGGREGATIONS = ("stack", "average")
INIT_LAYERS = ("net_a", "all", "all_but_fc8", "conv")
TRAINABLE = ("all", "fc", "fc8")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first field whose value is not allowed, and what is."""
    from vggjax import models  # imports jax: only when a config is actually used

    if not c.model:
        raise ValueError(
            "config.model is '', which takes the net of config.init_from, but "
            "config.init_from is empty; give a checkpoint or a model (e.g. D)"
        )
    models.resolve_name(c.model)
    checks = [
        ("num_classes", (c.num_classes or 0) > 0, "a positive integer"),
        ("width", c.width > 0, "a positive channel multiplier"),
        ("fc_width", c.fc_width > 0, "a positive integer"),
        ("crop_size", c.crop_size > 0 and c.crop_size % 32 == 0, "a positive multiple of 32"),
        ("dropout_rate", 0 <= c.dropout_rate < 1, "in [0, 1)"),
        (
            "kernel_init",
            c.kernel_init in models.KERNEL_INITS,
            f"one of {tuple(models.KERNEL_INITS)}",
        ),
        ("dtype", c.dtype in DTYPES, f"one of {DTYPES}"),
        ("dataset", c.dataset in DATASETS, f"one of {DATASETS}"),
        (
            "train_scale",
            len(c.train_scale) == 2 and c.crop_size <= c.train_scale[0] <= c.train_scale[1],
            "(S_min, S_max) with crop_size <= S_min <= S_max",
        ),
        ("eval_scale", c.eval_scale >= c.crop_size, "at least crop_size"),
        ("mean_rgb", len(c.mean_rgb) == 3, "three numbers (R, G, B on the 0–255 scale)"),
        ("batch_size", c.batch_size > 0, "a positive integer"),
        (
            "num_epochs",
            c.num_epochs > 0 or c.num_train_steps > 0,
            "positive (or num_train_steps > 0)",
        ),
        ("learning_rate", c.learning_rate > 0, "positive"),
        ("momentum", 0 <= c.momentum < 1, "in [0, 1)"),
        ("weight_decay", c.weight_decay >= 0, "non-negative"),
        ("lr_drop_factor", 0 < c.lr_drop_factor < 1, "in (0, 1)"),
        ("max_lr_drops", c.max_lr_drops >= 0, "a non-negative integer"),
        ("init_layers", c.init_layers in INIT_LAYERS, f"one of {INIT_LAYERS}"),
        ("trainable", c.trainable in TRAINABLE, f"one of {TRAINABLE}"),
        ("checkpoint_every_steps", c.checkpoint_every_steps > 0, "a positive integer"),
        (
            "eval.scales",
            len(c.eval.scales) > 0 and min(c.eval.scales) >= c.crop_size,
            "a non-empty list of test scales Q, each at least crop_size",
        ),
        (
            "eval.protocols",
            set(c.eval.protocols) <= set(EVAL_PROTOCOLS)
            and bool(set(c.eval.protocols) - {"fusion"}),
            f"some of {EVAL_PROTOCOLS}, not fusion alone (it fuses the others)",
        ),
        (
            "eval.checkpoints",
            "fusion" not in c.eval.protocols or len(c.eval.checkpoints) > 1,
            "two or more checkpoint paths for the fusion protocol",
        ),
        ("eval.batch_size", c.eval.batch_size > 0, "a positive integer"),
        (
            "eval.bucket_multiple",
            c.eval.bucket_multiple > 0 and c.eval.bucket_multiple % 32 == 0,
            "a positive multiple of 32",
        ),
        (
            "features.scales",
            len(c.features.scales) > 0 and min(c.features.scales) >= c.crop_size,
            "a non-empty list of test scales Q, each at least crop_size",
        ),
        ("features.aggregation", c.features.aggregation in AGGREGATIONS, f"one of {AGGREGATIONS}"),
        (
            "features.splits",
            len(c.features.splits) > 0 and set(c.features.splits) <= {"train", "val"},
            "some of ('train', 'val')",
        ),
        (
            "transfer.c_values",
            len(c.transfer.c_values) > 0 and min(c.transfer.c_values) > 0,
            "a non-empty list of positive numbers",
        ),
        ("transfer.validation_fraction", 0 < c.transfer.validation_fraction < 1, "in (0, 1)"),
        ("transfer.random_splits", c.transfer.random_splits >= 0, "a non-negative integer"),
        ("transfer.train_per_class", c.transfer.train_per_class > 0, "a positive integer"),
        ("transfer.test_per_class", c.transfer.test_per_class > 0, "a positive integer"),
    ]
    for field, ok, allowed in checks:
        if not ok:
            value = functools.reduce(lambda config, key: config[key], field.split("."), c)
            raise ValueError(f"config.{field} must be {allowed}, got {value!r}")
