"""Appendix A's boxes: how a net predicts one, how it is scored, and how many become one.

A box is (x0, y0, x1, y1) in pixel edges: pixel i spans [i, i + 1), so x1 and y1 lie just past
the last pixel and a box's width is x1 − x0. The localisation net's last layer predicts a box as
its centre, width and height (Sect. A.1) in units of the crop it sees, from the crop's top-left
corner (`encode`, `decode`): the same four numbers mean the same box in any window of a dense map.
One box for all classes is single-class regression (SCR, fc8 has 4 outputs); one per class is
per-class regression (PCR, 4 × classes, class c's at 4c … 4c + 3).

Everything here is pure: numpy on the host (merging, the error criteria), jax or numpy on the
device (the loss, `select`, `decode`, `iou`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (x0, y0, x1, y1) @ ENCODE = (centre x, centre y, width, height); DECODE is its inverse.
ENCODE = np.array([[0.5, 0, -1, 0], [0, 0.5, 0, -1], [0.5, 0, 1, 0], [0, 0.5, 0, 1]], np.float32)
DECODE = np.linalg.inv(ENCODE).astype(np.float32)

# The ILSVRC criterion (Russakovsky et al., 2014): a box is right when its IoU is above this.
IOU_THRESHOLD = 0.5


def encode(boxes: Any, crop: float) -> Any:
    """Boxes (..., 4) in a crop's pixels → the net's targets: centre, width, height over `crop`."""
    return boxes @ ENCODE / crop


def decode(params: Any, crop: float) -> Any:
    """The net's box parameters (..., 4) → boxes in the pixels of the crop they were predicted in."""
    return params @ DECODE * crop


def _xp(*arrays: Any) -> Any:
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def iou(a: Any, b: Any) -> Any:
    """Intersection over union of boxes a and b (..., 4), broadcast; 0 for empty boxes."""
    xp = _xp(a, b)
    w = xp.clip(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0, None)
    h = xp.clip(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h

    def area(box):
        return xp.clip(box[..., 2] - box[..., 0], 0, None) * xp.clip(
            box[..., 3] - box[..., 1], 0, None
        )

    union = area(a) + area(b) - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0)


def select(outputs: jax.Array, classes: jax.Array) -> jax.Array:
    """The box parameters fc8 gives for `classes`: outputs (N, ..., 4 or 4C), classes (N, K) →
    (N, ..., K, 4). PCR: class c's four outputs; SCR: its four, whatever the class."""
    n, spatial = outputs.shape[0], outputs.shape[1:-1]
    per_class = outputs.reshape(n, *spatial, -1, 4)
    if per_class.shape[-2] == 1:
        classes = jnp.zeros_like(classes)
    index = classes.reshape(n, *(1,) * len(spatial), classes.shape[-1], 1)
    return jnp.take_along_axis(per_class, index, axis=-2)


def euclidean_loss(params: jax.Array, target: jax.Array) -> jax.Array:
    """Sect. A.1's Euclidean loss, Caffe's form: ½ the squared distance of the four numbers."""
    return 0.5 * jnp.sum(jnp.square(params - target), axis=-1)


def merge(boxes: np.ndarray, scores: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Sermanet et al.'s greedy merging: while the closest pair of boxes (highest IoU) has IoU of
    at least `min_iou`, replace the pair by one box, the mean of the coordinates of all the boxes
    it stands for; its score is the sum of theirs. boxes (n, 4), scores (n,) → merged (m, 4), (m,).
    """
    n = len(boxes)
    sums, counts = np.array(boxes, np.float64), np.ones(n)
    scores = np.array(scores, np.float64)
    alive = np.ones(n, bool)
    close = iou(sums[:, None], sums[None])
    np.fill_diagonal(close, -1.0)
    while n > 1:
        i, j = np.unravel_index(np.argmax(close), close.shape)
        if close[i, j] < min_iou:
            break
        sums[i] += sums[j]
        counts[i] += counts[j]
        scores[i] += scores[j]
        alive[j], n = False, n - 1
        close[j], close[:, j] = -1.0, -1.0
        row = np.where(alive, iou(sums[i] / counts[i], sums / counts[:, None]), -1.0)
        row[i] = -1.0
        close[i], close[:, i] = row, row
    return (sums / counts[:, None])[alive], scores[alive]


def best_box(boxes: np.ndarray, scores: np.ndarray, min_iou: float) -> tuple[np.ndarray, float]:
    """One class's prediction: its boxes merged, the merged box of the highest score."""
    merged, merged_scores = merge(boxes, scores, min_iou)
    best = int(np.argmax(merged_scores))
    return merged[best], float(merged_scores[best])


def localised(box: np.ndarray, truth: np.ndarray) -> bool:
    """The ILSVRC criterion: IoU above 0.5 with one of the class's ground-truth boxes (K, 4)."""
    return bool(len(truth)) and bool(np.max(iou(np.asarray(box), truth)) > IOU_THRESHOLD)


def gt_class_error(boxes: np.ndarray, truth: list[np.ndarray], bad: np.ndarray) -> float:
    """Table 8's error: the share of images whose box for the ground-truth class (N, 4) has
    IoU ≤ 0.5 with every ground-truth box; undecodable images (`bad`) are errors."""
    right = [localised(b, t) and not x for b, t, x in zip(boxes, truth, bad)]
    return 1.0 - float(np.mean(right)) if right else 0.0


def top5_error(
    classes: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    truth: list[np.ndarray],
    bad: np.ndarray,
) -> float:
    """Table 9's error by the ILSVRC criterion: an image is right when one of its (class, box)
    guesses, classes (N, 5) and boxes (N, 5, 4), has the right class and is `localised`."""
    right = [
        not x and any(c == label and localised(b, t) for c, b in zip(cs, bs))
        for cs, bs, label, t, x in zip(classes, boxes, labels, truth, bad)
    ]
    return 1.0 - float(np.mean(right)) if right else 0.0
