"""Every allowed value of a config field, and the checks that read them: one place.

The code that acts on a value reads it from here too (a trainable set's layers, a protocol's
column in the paper's tables), so a value cannot be allowed without meaning something. The
data sets live beside what they name (`data.sources.DATASETS`) and are read from here. The net's
fields (`models.MODEL_FIELDS`: its name, classes, objective, widths, crop, dropout, kernel init,
dtype, Winograd) are defined with their allowed values in `models.ModelSpec`, whose check
`validate` runs, so `models.create_model` and a config fail alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vggjax import models
from vggjax.data import sources
from vggjax.errors import UserError, require

DATASETS = sources.DATASETS
SPLITS = sources.SPLITS

# Test protocols (Sect. 3.2, 4.2–4.4) → their "evaluation method" column in Tables 3–6.
# fusion averages the posteriors of several checkpoints for each of the other protocols.
EVAL_PROTOCOLS = {
    "dense": "dense",
    "multi_scale_dense": "dense",
    "multi_crop": "multi-crop",
    "multi_crop_dense": "multi-crop & dense",
    "centre_crop": "centre crop",
    "fusion": "fusion",
}

# config.eval.dense_alignment → where the dense protocols' score map lies on an image (and
# config.features.dense_alignment: Appendix B's fc7 map). Its windows are crop-sized at a stride
# of 32 and pooling floors each map, so up to 31 pixels of a side fall outside every window
# (`engine.buckets.unseen_margins`): the fractions of that margin the map is shifted by, on each
# side; several make a grid of shifts whose maps are averaged together.
DENSE_ALIGNMENTS: dict[str, tuple[float, ...]] = {
    "top_left": (0.0,),  # the paper's and Caffe's: the margin is lost at the bottom and right
    "centred": (0.5,),  # the margin split evenly between the sides: one pass, as top_left
    "grid": (0.0, 0.5, 1.0),  # 3×3 shifts spanning the margin: every pixel in a window, 9 passes
}

# Appendix A's test protocols (vggjax/evaluators/localisation.py): Table 8's (the central crop's
# box for the ground-truth class: gt_class_error) and Table 9's (dense, merged, top-5 classes:
# top5_error).
LOC_PROTOCOLS = ("gt_class", "top5")

# config.lr_schedule: the paper's rate divided on plateaus of validation accuracy (Sect. 3.1),
# or, for a fixed budget, linear warm-up then cosine or linear decay to 0 (vggjax/train.py).
LR_SCHEDULES = ("plateau", "cosine", "linear")

# Appendix B: descriptors at several Q stacked (the paper's Caltech) or averaged (VOC).
AGGREGATIONS = ("stack", "average")

# Sect. 3.1: "we initialised the first four convolutional layers and the last three
# fully-connected layers with the layers of net A". Net A's first four convs are conv1_1,
# conv2_1, conv3_1 and conv3_2; every deeper net has layers of those names and shapes.
NET_A_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")

# config.init_layers → which layers (by name, without "_bn") `init_from` copies. all_but_fc8:
# fine-tuning for new classes; conv: from a checkpoint without the top (Keras's _notop files).
INIT_LAYERS: dict[str, Callable[[str], bool]] = {
    "net_a": lambda name: name in NET_A_LAYERS,
    "all": lambda name: True,
    "all_but_fc8": lambda name: name != "fc8",
    "conv": lambda name: name not in models.FC_LAYERS,
}

# config.trainable → the layers SGD updates (None: all); a BN layer goes with its conv.
TRAINABLE: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "fc": models.FC_LAYERS,
    "fc8": ("fc8",),
}


def one_of(field: str, value: Any, allowed: Any) -> None:
    """UserError unless `value` is one of `allowed` (a tuple or the keys of a dict)."""
    require(value in allowed, field, f"one of {tuple(allowed)}", value)


def check_train_scale(config: Any) -> None:
    """Sect. 3.1 crops from images rescaled to S: S_min at least the crop (less twice the
    padding, `crop_padding`)."""
    s_min, s_max = config.train_scale
    span = config.crop_size - 2 * config.get("crop_padding", 0)
    require(
        span <= s_min <= s_max,
        "config.train_scale",
        f"(S_min, S_max) with crop_size - 2 * crop_padding ({span}) <= S_min <= S_max",
        tuple(config.train_scale),
    )


def check_eval_scale(config: Any) -> None:
    """The validation pass crops from images rescaled to Q: Q at least the crop."""
    require(
        config.eval_scale >= config.crop_size,
        "config.eval_scale",
        f"at least crop_size ({config.crop_size})",
        config.eval_scale,
    )


def check_start(c: Any) -> None:
    """Sect. A.1: a localisation net starts from a classification run, only its fc8 new; one
    trained from random weights is asked for by name (`loc.from_scratch`), never by omission.
    Checked when training starts: testing a localisation net needs no `init_from`."""
    if c.objective == "classification":
        return
    if not c.init_from and not c.loc.from_scratch:
        raise UserError(
            f"config.init_from is empty, but a localisation net (objective {c.objective}) is "
            "trained from a classification run (Appendix A.1): name one, or set "
            "--config.loc.from_scratch=True to start from random weights"
        )
    if c.init_from and c.loc.from_scratch:
        raise UserError(
            f"config.loc.from_scratch is True but config.init_from is {c.init_from!r}: "
            "give one of them"
        )


def _checks(c: Any) -> list[tuple[str, bool, str]]:
    """(field, ok, what is allowed) for every training field that is not a model field or a
    choice."""
    positive_int = "a positive integer"
    return [
        ("train_scale", len(c.train_scale) == 2, "(S_min, S_max)"),
        ("mean_rgb", len(c.mean_rgb) == 3, "three numbers (R, G, B on the 0–255 scale)"),
        ("batch_size", c.batch_size > 0, positive_int),
        (
            "num_epochs",
            c.num_epochs > 0 or c.num_train_steps > 0,
            "positive (or num_train_steps > 0)",
        ),
        ("learning_rate", c.learning_rate > 0, "positive"),
        ("momentum", 0 <= c.momentum < 1, "in [0, 1)"),
        ("weight_decay", c.weight_decay >= 0, "non-negative"),
        ("warmup_epochs", c.warmup_epochs >= 0, "non-negative"),
        ("crop_padding", c.crop_padding >= 0, "a non-negative integer"),
        ("lr_drop_factor", 0 < c.lr_drop_factor < 1, "in (0, 1)"),
        ("max_lr_drops", c.max_lr_drops >= 0, "a non-negative integer"),
        ("checkpoint_every_steps", c.checkpoint_every_steps > 0, positive_int),
        (
            "profile_steps",
            len(c.profile_steps) == 0
            or (len(c.profile_steps) == 2 and 0 < c.profile_steps[0] <= c.profile_steps[1]),
            "() or (FIRST, LAST): the train steps to trace, 1 <= FIRST <= LAST",
        ),
    ]


def _test_checks(c: Any) -> list[tuple[str, bool, str]]:
    """`_checks` of the test protocols' fields: evaluation, features, transfer, localisation."""
    scales = "a non-empty list of test scales Q, each at least crop_size"
    positive_int = "a positive integer"
    return [
        ("eval.scales", len(c.eval.scales) > 0 and min(c.eval.scales) >= c.crop_size, scales),
        (
            "eval.protocols",
            set(c.eval.protocols) <= set(EVAL_PROTOCOLS)
            and bool(set(c.eval.protocols) - {"fusion"}),
            f"some of {tuple(EVAL_PROTOCOLS)}, not fusion alone (it fuses the others)",
        ),
        (
            "eval.checkpoints",
            "fusion" not in c.eval.protocols or len(c.eval.checkpoints) > 1,
            "two or more checkpoint paths for the fusion protocol",
        ),
        ("eval.batch_size", c.eval.batch_size > 0, positive_int),
        (
            "eval.bucket_multiple",
            c.eval.bucket_multiple > 0 and c.eval.bucket_multiple % 32 == 0,
            "a positive multiple of 32",
        ),
        ("eval.buckets_per_octave", c.eval.buckets_per_octave > 0, positive_int),
        (
            "features.scales",
            len(c.features.scales) > 0 and min(c.features.scales) >= c.crop_size,
            scales,
        ),
        (
            "features.splits",
            len(c.features.splits) > 0 and set(c.features.splits) <= set(SPLITS),
            f"some of {SPLITS}",
        ),
        (
            "transfer.c_values",
            len(c.transfer.c_values) > 0 and min(c.transfer.c_values) > 0,
            "a non-empty list of positive numbers",
        ),
        ("transfer.validation_fraction", 0 < c.transfer.validation_fraction < 1, "in (0, 1)"),
        ("transfer.random_splits", c.transfer.random_splits >= 0, "a non-negative integer"),
        ("transfer.train_per_class", c.transfer.train_per_class > 0, positive_int),
        ("transfer.test_per_class", c.transfer.test_per_class > 0, positive_int),
        ("loc.scales", len(c.loc.scales) > 0 and min(c.loc.scales) >= c.crop_size, scales),
        (
            "loc.protocols",
            len(c.loc.protocols) > 0 and set(c.loc.protocols) <= set(LOC_PROTOCOLS),
            f"some of {tuple(LOC_PROTOCOLS)}",
        ),
        ("loc.merge_iou", 0 < c.loc.merge_iou <= 1, "in (0, 1]"),
        ("loc.max_aspect", c.loc.max_aspect >= 1, "at least 1"),
    ]


def validate(c: Any) -> None:
    """UserError naming the first field of config `c` whose value is not allowed, and what is."""
    if not c.model:
        raise UserError(
            "config.model is '', which takes the net of config.init_from, but "
            "config.init_from is empty; give a checkpoint or a model (e.g. D)"
        )
    models.ModelSpec(**{field: c[field] for field in models.MODEL_FIELDS}).check("config.")
    require(sources.known_dataset(c.dataset), "config.dataset", f"one of {DATASETS}", c.dataset)
    for field, value, allowed in [
        ("init_layers", c.init_layers, INIT_LAYERS),
        ("trainable", c.trainable, TRAINABLE),
        ("lr_schedule", c.lr_schedule, LR_SCHEDULES),
        ("features.aggregation", c.features.aggregation, AGGREGATIONS),
        ("eval.dense_alignment", c.eval.dense_alignment, DENSE_ALIGNMENTS),
        ("features.dense_alignment", c.features.dense_alignment, DENSE_ALIGNMENTS),
    ]:
        one_of(f"config.{field}", value, allowed)
    for field, ok, allowed in _checks(c) + _test_checks(c):
        if not ok:
            value = functools.reduce(lambda config, key: config[key], field.split("."), c)
            require(False, f"config.{field}", allowed, value)
    check_train_scale(c)
    check_eval_scale(c)
