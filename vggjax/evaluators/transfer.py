"""Appendix B's classifier: linear SVMs on very deep features, scored as the paper scores them
(the `transfer` evaluator).

One-vs-rest L2-regularised squared-hinge SVMs (the "L2-loss SVM", liblinear's default), fitted
jointly by L-BFGS on the device: the objective is a sum of one term per class, so one run fits
all classes. The SVM's C is chosen on 20% of the training images held out (the Caltech
protocol's validation split), then the SVMs are refitted on all of them. Reported on the test
split: mean class recall (Caltech), mean average precision (VOC: all-point, and 11-point as in
the VOC-2007 devkit) and accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vggjax import storage
from vggjax.errors import UserError
from vggjax.evaluators import features


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_linear_svm(
    x: jax.Array, positives: jax.Array, c: float, max_iter: int = 500, tol: float = 1e-5
) -> tuple[jax.Array, jax.Array]:
    """One-vs-rest linear SVMs minimising, for each class k,
    ½‖w_k‖² + C Σ_i max(0, 1 − y_ik (w_k·x_i + b_k))², y_ik = +1 if positives[i, k] else −1.
    The bias is not regularised.

    Args:
      x: (N, D) features.
      positives: (N, K) booleans: one-hot for single-label data, several per row for
        multi-label data such as VOC.
      c: the SVM's C (larger: less regularisation).
      max_iter: L-BFGS steps at most.
      tol: stops once the gradient norm falls below `tol` times its initial value.

    Returns:
      Weights (D, K) and biases (K,).
    """
    y = jnp.where(positives, 1.0, -1.0)

    def objective(params):
        w, b = params
        margins = jnp.maximum(0.0, 1.0 - y * (x @ w + b))
        return 0.5 * jnp.sum(w * w) + c * jnp.sum(margins * margins)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(params, updates), state, optax.tree.norm(grad)

    def going(carry):
        _, state, grad_norm = carry
        count = optax.tree.get(state, "count")
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol * initial))

    params = (jnp.zeros((x.shape[1], y.shape[1])), jnp.zeros(y.shape[1]))
    initial = optax.tree.norm(jax.grad(objective)(params))
    params, _, _ = jax.lax.while_loop(going, step, (params, solver.init(params), initial))
    return params


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) labels → (N, num_classes) booleans, as `fit_linear_svm` takes them."""
    return labels[:, None] == np.arange(num_classes)


def mean_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    """The Caltech protocol: the recall (accuracy) of each class present, averaged over classes,
    so that classes with many test images count no more than the others."""
    predicted = scores.argmax(1)
    return float(np.mean([np.mean(predicted[labels == k] == k) for k in np.unique(labels)]))


def average_precision(
    scores: np.ndarray, positive: np.ndarray, eleven_point: bool = False
) -> float:
    """The VOC protocol's AP of one class: the area under the precision/recall curve with
    precision made monotone (VOC 2010 on), or its mean at recall 0, 0.1, …, 1 (VOC 2007)."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positive[order])
    if hits[-1] == 0:
        return float("nan")
    recall = hits / hits[-1]
    precision = hits / np.arange(1, len(hits) + 1)
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() for t in np.linspace(0, 1, 11)]))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * envelope))


def mean_average_precision(
    scores: np.ndarray, positives: np.ndarray, eleven_point: bool = False
) -> float:
    """AP averaged over the classes with at least one positive test image."""
    aps = [
        average_precision(scores[:, k], positives[:, k], eleven_point)
        for k in range(scores.shape[1])
        if positives[:, k].any()
    ]
    return float(np.mean(aps))


def held_out(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A boolean mask of `fraction` of each class's images: at least one of a class that has
    two or more, and never all of them, so every class keeps a training image."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        if len(members) > 1:
            mask[members[: min(len(members) - 1, max(1, round(fraction * len(members))))]] = True
    return mask


def scores_of(params: tuple[jax.Array, jax.Array], x: np.ndarray) -> np.ndarray:
    """The SVMs' scores (N, K) of features x (N, D): `fit_linear_svm`'s (weights, biases)."""
    w, b = params
    return np.asarray(x @ np.asarray(w) + np.asarray(b))


def evaluate_svm(
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    num_classes: int,
    c_values: tuple[float, ...],
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Chooses C on held-out training images (by mean class recall; no choice for one C),
    refits on all training images, and scores the test images.

    Args:
      train, test: `features.extract`'s arrays (or a subset: `features`, `labels`, `bad`).
        Undecodable training images are left out; undecodable test images keep their zero
        descriptor (scored by the biases alone) and count.
      num_classes: the SVMs to fit.
      c_values: the candidate Cs.
      validation_fraction: of each class's training images held out to choose C.
      seed: which images are held out.

    Returns:
      The chosen `c`, each C's held-out recall, and on the test images `mean_class_recall`,
      `accuracy`, `mean_ap` and `mean_ap_11pt`, with chance recall and the image counts.

    Raises:
      UserError: several Cs, but every class has a single training image: none to hold out.
    """
    keep = ~train["bad"]
    x, labels = train["features"][keep], train["labels"][keep]
    recall_at = {}
    if len(c_values) > 1:
        validation = held_out(labels, validation_fraction, seed)
        if not validation.any():
            raise UserError(
                "every class has a single training image: none can be held out to "
                "choose the SVM's C; give one, e.g. --config.transfer.c_values="
                "'(1.0,)'"
            )
        for c in c_values:
            params = fit_linear_svm(x[~validation], one_hot(labels[~validation], num_classes), c)
            recall_at[c] = mean_class_recall(scores_of(params, x[validation]), labels[validation])
    # The best held-out recall; ties go to the stronger regularisation (the smaller C).
    best = max(c_values, key=lambda c: (recall_at.get(c, 0.0), -c))
    params = fit_linear_svm(x, one_hot(labels, num_classes), best)
    scores = scores_of(params, test["features"])
    positives = one_hot(test["labels"], num_classes)
    return dict(
        c=best,
        validation_mean_class_recall={str(c): r for c, r in recall_at.items()},
        mean_class_recall=mean_class_recall(scores, test["labels"]),
        accuracy=float(np.mean(scores.argmax(1) == test["labels"])),
        mean_ap=mean_average_precision(scores, positives),
        mean_ap_11pt=mean_average_precision(scores, positives, eleven_point=True),
        chance_recall=1.0 / num_classes,
        train_images=int(keep.sum()),
        test_images=len(test["labels"]),
        feature_dim=int(x.shape[1]),
    )


def random_splits(
    labels: np.ndarray, train_per_class: int, test_per_class: int, count: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Caltech protocol's random splits of one labelled set.

    Args:
      labels: (N,) the set's labels.
      train_per_class: images of each class to train on.
      test_per_class: at most this many of each class's other images to test on.
      count: how many splits.
      seed: the draw.

    Returns:
      `count` pairs of sorted index arrays (train, test).

    Raises:
      UserError: a class has no more than `train_per_class` images: none left to test on.
    """
    classes, sizes = np.unique(labels, return_counts=True)
    if sizes.min() <= train_per_class:
        raise UserError(
            f"class {classes[sizes.argmin()]} has {sizes.min()} images; the random "
            f"splits take {train_per_class} per class to train on and need at least "
            f"one more to test (config.transfer.train_per_class)"
        )
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(count):
        train, test = [], []
        for k in classes:
            members = rng.permutation(np.flatnonzero(labels == k))
            train.append(members[:train_per_class])
            test.append(members[train_per_class : train_per_class + test_per_class])
        splits.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return splits


def _subset(data: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: data[k][index] for k in ("features", "labels", "bad")}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The `transfer` evaluator (`--mode=transfer`): Appendix B's SVMs on very deep features.

    SVMs are fitted on the 'train' split's features and scored on 'val's; or, with
    `transfer.random_splits`, on random splits of 'train' alone (Caltech's protocol). Features
    are reused from the workdir's features_<split>.npz when made with the same settings.

    Args:
      config: `config.features` (what the descriptors are) and `config.transfer` (the Cs,
        held-out fraction, random splits).
      workdir: the default net, where the features are cached, and where
        transfer_results.json is written (process 0).

    Returns:
      What transfer_results.json holds: `evaluate_svm`'s figures (over random splits: their
      mean, a `<figure>_std` beside each, and each split's), with the features' settings.
    """
    t = config.transfer
    fit = functools.partial(
        evaluate_svm,
        c_values=tuple(t.c_values),
        validation_fraction=t.validation_fraction,
        seed=config.seed,
    )
    train = features.cached(config, workdir, "train")
    num_classes = int(train["num_classes"])
    if t.random_splits:
        result, what = _over_random_splits(fit, train, num_classes, t, config.seed)
    else:
        result = fit(train, features.cached(config, workdir, "val"), num_classes)
        what = (
            f"{result['train_images']} training images (C={result['c']:g}); "
            f"{result['test_images']} test images"
        )
    result = dict(features.settings(config, workdir), **result)
    if jax.process_index() == 0:
        _report(result, what)
        storage.write_json(storage.at(workdir) / "transfer_results.json", result)
    return result


def _over_random_splits(
    fit: Callable[..., dict[str, Any]], train: dict[str, Any], num_classes: int, t: Any, seed: int
) -> tuple[dict[str, Any], str]:
    """Caltech's protocol: `fit` on each random split of `train`; each figure's mean, a
    `<figure>_std` beside it and each split's; and what the splits were, in words."""
    splits = random_splits(
        train["labels"], t.train_per_class, t.test_per_class, t.random_splits, seed
    )
    runs = [fit(_subset(train, a), _subset(train, b), num_classes) for a, b in splits]
    result = {k: runs[0][k] for k in ("chance_recall", "feature_dim")}
    for k in ("mean_class_recall", "accuracy", "mean_ap", "mean_ap_11pt"):
        values = [r[k] for r in runs]
        result.update({k: float(np.mean(values)), f"{k}_std": float(np.std(values))})
    result["splits"] = runs
    what = (
        f"{t.random_splits} random splits of {t.train_per_class} training and up to "
        f"{t.test_per_class} test images per class"
    )
    return result, what


def _report(result: dict[str, Any], what: str) -> None:
    """The figures on stdout, each as a percentage (± its standard deviation over splits)."""

    def figure(k: str) -> str:
        std = f" ± {100 * result[k + '_std']:.1f}" if k + "_std" in result else ""
        return f"{100 * result[k]:.1f}{std}%"

    print(f"Linear SVM on {result['feature_dim']}-D features, {what}:")
    print(
        f"  mean class recall {figure('mean_class_recall')} (chance "
        f"{100 * result['chance_recall']:.1f}%), accuracy {figure('accuracy')}, "
        f"mAP {figure('mean_ap')} (11-point {figure('mean_ap_11pt')})"
    )
