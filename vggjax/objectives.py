"""What fc8 learns (`config.objective`): class scores (Sect. 3.1) or a box (Appendix A).

An objective is the per-image loss the train step minimises and the per-image errors the
progress line and the validation pass count; the first of them, `watch`, drives the
learning-rate cut. The training loop is the same for all (vggjax/train.py). fc8's width for each
is the net's to know (`models.FC8_OUTPUTS`, under the same names): the net needs no box maths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vggjax import localise

Batch = dict[str, jax.Array]


class Objective(NamedTuple):
    loss: Callable[[jax.Array, Batch], jax.Array]  # (fc8's output, batch) → (N,) losses
    errors: Callable[[jax.Array, Batch], dict[str, jax.Array]]  # name → (N,) 0 or 1
    watch: str  # the error the validation pass reports to the learning-rate schedule


def softmax_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """Sect. 3.1: the multinomial logistic regression objective."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def top_k_errors(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Top-1 and top-5 classification errors."""
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit = top5 == batch["label"][:, None]
    return dict(
        top1_error=1.0 - hit[:, 0].astype(jnp.float32),
        top5_error=1.0 - jnp.any(hit, axis=1).astype(jnp.float32),
    )


def _box(outputs: jax.Array, batch: Batch) -> jax.Array:
    """The predicted box parameters for each image's own class (PCR) or its one box (SCR)."""
    return localise.select(outputs, batch["label"][:, None])[:, 0]


def box_loss(outputs: jax.Array, batch: Batch) -> jax.Array:
    """Sect. A.1: the Euclidean loss to the target box; for PCR only the ground-truth class's four
    outputs are penalised, the others get no gradient."""
    return localise.euclidean_loss(_box(outputs, batch), batch["box"])


def box_errors(outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """The ILSVRC criterion against the target box: IoU ≤ 0.5 is an error."""
    iou = localise.iou(
        localise.decode(_box(outputs, batch), 1.0), localise.decode(batch["box"], 1.0)
    )
    return dict(loc_error=(iou <= localise.IOU_THRESHOLD).astype(jnp.float32))


OBJECTIVES = {
    "classification": Objective(softmax_loss, top_k_errors, "top1_error"),
    # Appendix A: single-class regression (one box) and per-class regression (a box per class).
    "scr": Objective(box_loss, box_errors, "loc_error"),
    "pcr": Objective(box_loss, box_errors, "loc_error"),
}
