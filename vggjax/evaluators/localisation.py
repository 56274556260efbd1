"""Testing localisation nets as in Appendix A: the `localisation` evaluator (`--mode=eval` for
objective scr or pcr).

- **gt_class** (Table 8): the net on the central crop of the image rescaled to Q =
  `config.eval_scale`, the box it predicts for the ground-truth class; an error when its IoU
  is at most 0.5 with every ground-truth box.
- **top5** (Table 9): the dense net over the whole image at each Q of `config.loc.scales`: every
  position of its output map predicts a box, in the window the position sees, for each of the
  image's top-5 classes. Those classes come from a classification run (`config.loc.classifier`,
  default `config.init_from`) evaluated with the dense multi-scale protocol (Sect. 3.2, Q =
  `config.eval.scales`); the classification net's own dense map at the same positions rates
  each box with its class's posterior there. Per class the boxes of all scales (and, with
  several `config.loc.checkpoints`, of all nets: their union) are merged greedily
  (`localise.merge`), and the merged box of the highest summed score is the guess. An image is
  right when one of its five (class, box) guesses has its class and IoU > 0.5 with one of its
  ground-truth boxes.

Both run on the bucketed inference engine (`vggjax.engine`), the per-image labels or top-5
classes riding along as the engine's per-image inputs. Boxes are kept as fractions of the
image's width and height, which IoU does not mind, and written in the original image's pixels.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vggjax import checkpoints, engine, localise, models, pretrained, storage
from vggjax.data import boxes
from vggjax.errors import UserError
from vggjax.evaluators import classification

TOP = 5  # the ILSVRC localisation task's guesses per image
_FINE_TUNED = {"all": "all", "fc": "fc6–fc8", "fc8": "fc8"}  # Table 8's column, by config.trainable


def _xyxy(yx: jax.Array) -> jax.Array:
    """(..., 2) (y, x) pairs → (..., 4) (x, y, x, y), to shift or scale boxes with."""
    return jnp.concatenate([yx[..., ::-1], yx[..., ::-1]], axis=-1)


def centre_box(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    label: jax.Array,
    **_: Any,
) -> jax.Array:
    """Table 8's box: the one the net predicts from the image's central crop (an engine `Head`).

    Args:
      model: the localisation net; variables: its under "loc".
      images, sizes: a padded, mean-subtracted batch and each image's valid (height, width).
      label: (N,) the class to box: the ground truth's (PCR has a box per class).

    Returns:
      (N, 4) boxes (x0, y0, x1, y1) as fractions of the image, cut to it.
    """
    crop = model.crop_size
    offsets = (sizes - crop) // 2
    outputs = model.apply(variables["loc"], classification.crops_at(images, offsets, crop))
    params = localise.select(outputs.astype(jnp.float32), label[:, None])[:, 0]
    return jnp.clip((localise.decode(params, crop) + _xyxy(offsets)) / _xyxy(sizes), 0, 1)


def _spread(valid: jax.Array, width: int, positions: int) -> tuple[jax.Array, jax.Array]:
    """Up to `positions` of each image's valid map positions (a top-left block of size `valid`
    (N, 2) in a map `width` wide), evenly spaced when it has more: flat indices, and which are."""
    count = valid[:, :1] * valid[:, 1:]
    k = jnp.arange(positions)[None]
    index = jnp.where(count > positions, k * count // positions, k)
    return (index // valid[:, 1:]) * width + index % valid[:, 1:], k < count


def dense_boxes(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    classes: jax.Array,
    *,
    classifier: models.VGG,
    shift: tuple[float, ...],
    positions: int,
    **_: Any,
) -> jax.Array:
    """Table 9's boxes at one Q, each rated by the classifier at the same map position (an
    engine `Head`).

    Args:
      model: the localisation net; variables: its under "loc", the classifier's under "cls".
      images, sizes: a padded, mean-subtracted batch and each image's valid (height, width).
      classes: (N, K) the classes to box: each image's top-K by the classifier.
      classifier: the classification net; its dense map must align with `model`'s (same crop).
      shift: the localisation net's mean RGB minus the classifier's, added to the images.
      positions: map positions kept per image, evenly spaced when it has more (a fixed width
        for the program, `max_positions`).

    Returns:
      (N, positions · K · 5): per position and class, the box (x0, y0, x1, y1, fractions of the
      image) and the classifier's posterior of the class there; NaN rows where an image has
      fewer positions.
    """
    crop = model.crop_size
    maps = model.apply(variables["loc"], images, dense=True, sizes=sizes).astype(jnp.float32)
    n, h, w = maps.shape[:3]
    corners = 32 * jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij"), -1)
    found = localise.decode(localise.select(maps, classes), crop) + _xyxy(corners)[:, :, None]
    found = found / _xyxy(sizes)[:, None, None, None]
    scores = classifier.apply(
        variables["cls"], images + jnp.asarray(shift), dense=True, sizes=sizes
    )
    scores = jax.nn.softmax(scores.astype(jnp.float32))
    scores = jnp.take_along_axis(scores, classes[:, None, None, :], axis=-1)
    rows = jnp.concatenate([found, scores[..., None]], -1).reshape(n, h * w, -1)
    index, real = _spread(models.dense_map_sizes(sizes, crop), w, positions)
    rows = jnp.take_along_axis(rows, index[..., None], axis=1)
    return jnp.where(real[..., None], rows, jnp.nan).reshape(n, -1)


def max_positions(q: int, crop: int, max_aspect: float) -> int:
    """The map positions of an image with smallest side q and the other max_aspect × q."""
    side = lambda n: n // 32 - crop // 32 + 1
    return side(q) * side(int(max_aspect * q))


class Net(NamedTuple):
    """A localisation net to test: its checkpoint, and its config (its net and objective, with
    the scales it is tested at, and the run's other settings)."""

    path: str
    config: ml_collections.ConfigDict


def nets(config: ml_collections.ConfigDict, workdir: str) -> list[Net]:
    """The localisation nets to test: `config.loc.checkpoints`, or the workdir's.

    One net is tested at the config's `loc.scales` and `eval_scale`; in a union (Table 9's
    fusion) each at those its own run recorded.

    Raises:
      UserError: a checkpoint without config.json, or of a classification net.
    """
    paths = tuple(config.loc.checkpoints) or (workdir,)
    out = []
    for path in paths:
        recorded = pretrained.read_config(path)
        net = pretrained.with_net_of(config, path)
        if net.objective == "classification":
            raise UserError(
                f"{path} is a classification net; localisation tests nets trained with "
                "config.objective 'scr' or 'pcr'"
            )
        if len(paths) > 1:
            net.loc.scales = tuple(recorded.get("loc", {}).get("scales", net.loc.scales))
            net.eval_scale = recorded.get("eval_scale", net.eval_scale)
            net.train_scale = tuple(recorded.get("train_scale", net.train_scale))
            net.trainable = recorded.get("trainable", net.trainable)
        out.append(Net(path, net))
    return out


def classifier_config(config: ml_collections.ConfigDict) -> tuple[str, ml_collections.ConfigDict]:
    """The classification run giving the top-5 classes, and its config for the dense
    multi-scale protocol at `config.eval.scales`."""
    path = config.loc.classifier or config.init_from
    if not path:
        raise UserError(
            "config.loc.classifier must name the classification run giving the top-5 classes "
            "(it defaults to config.init_from, which is empty too)"
        )
    net = pretrained.with_net_of(config, path)
    if net.objective != "classification":
        raise UserError(f"config.loc.classifier {path} is a localisation net ({net.objective})")
    net.eval.protocols = ("multi_scale_dense",)
    return path, net


def top_classes(
    config: ml_collections.ConfigDict, source: boxes.BoxedSource
) -> tuple[np.ndarray, np.ndarray, Any, ml_collections.ConfigDict]:
    """Each image's top-5 classes by the classification run `classifier_config` names, with the
    dense multi-scale protocol (Sect. 3.2) at `config.eval.scales`.

    Returns:
      (classes (N, 5), their posteriors (N, 5), the classifier's variables, its config).
    """
    path, net = classifier_config(config)
    runner = classification.protocols_engine(net)
    variables = checkpoints.restore_params(path, runner.replicated)
    data = runner.run_source(variables, source, f"classifier {path}")
    posteriors = classification.protocol_posteriors(data["raw"], net)["multi_scale_dense"]
    classes = np.argsort(-posteriors, axis=1, kind="stable")[:, :TOP].astype(np.int32)
    return classes, np.take_along_axis(posteriors, classes, 1), variables, net


def _engine(net: Net, classifier: ml_collections.ConfigDict | None) -> engine.Engine:
    """The engine computing a net's heads: the central crop's box at its eval_scale (gt_class),
    the boxes of every position at each of its loc.scales (top5, when given a classifier)."""
    c = net.config
    plan: dict[int, tuple[str, ...]] = {}
    heads = {}
    if "gt_class" in c.loc.protocols:
        plan[c.eval_scale] = ("centre_box",)
        heads["centre_box"] = engine.Head(centre_box, lambda width: np.nan)
    if classifier is not None and classifier.crop_size != c.crop_size:
        raise UserError(
            f"the classifier's crop ({classifier.crop_size}) differs from localisation net "
            f"{net.path}'s ({c.crop_size}): their dense maps must align to rate the boxes"
        )
    for q in c.loc.scales if classifier is not None else ():
        name = f"boxes_q{q}"
        compute = functools.partial(
            dense_boxes,
            classifier=models.model_from_config(classifier),
            shift=tuple(np.subtract(c.mean_rgb, classifier.mean_rgb).tolist()),
            positions=max_positions(q, c.crop_size, c.loc.max_aspect),
        )
        heads[name] = engine.Head(compute, lambda width: np.nan)
        plan[q] = plan.get(q, ()) + (name,)
    return engine.Engine.from_config(c, plan, heads)


def guesses(raws: list[np.ndarray], min_iou: float) -> np.ndarray:
    """Table 9's guesses: per image and class, the boxes of every scale and net merged greedily,
    and the merged box of the highest summed rating kept.

    Args:
      raws: `dense_boxes` outputs (N × positions·TOP·5) of any scales and nets: their union.
      min_iou: merging joins the closest pair of boxes while their IoU is at least this.

    Returns:
      (N, TOP, 4) boxes, fractions of the image cut to it; NaN where there was none (an
      undecodable image).
    """
    out = np.full((len(raws[0]), TOP, 4), np.nan, np.float32)
    for i in range(len(out)):
        rows = np.concatenate([r[i].reshape(-1, TOP, 5) for r in raws])
        for j in range(TOP):
            found = rows[:, j][~np.isnan(rows[:, j, 0])]
            if len(found):
                out[i, j] = localise.best_box(found[:, :4], found[:, 4], min_iou)[0]
    return np.clip(out, 0, 1)


class _Truth(NamedTuple):
    """What the errors are measured against: labels, ground-truth boxes (fractions), and the
    images that could not be decoded."""

    labels: np.ndarray
    boxes: list[np.ndarray]
    bad: np.ndarray


def _gt_class_row(net: Net, raw: dict, truth: _Truth) -> dict[str, Any]:
    c = net.config
    found = raw["centre_box", c.eval_scale]
    return dict(
        protocol="gt_class",
        checkpoint=net.path,
        fine_tuned=c.trainable,
        regression=c.objective,
        test_scales=[c.eval_scale],
        gt_class_error=localise.gt_class_error(found, truth.boxes, truth.bad),
    )


def _top5_row(
    tested: list[Net], raws: list[np.ndarray], classes: np.ndarray, truth: _Truth
) -> tuple[dict[str, Any], np.ndarray]:
    """Table 9's row for the union of `tested` nets' boxes, and each image's five boxes."""
    found = guesses(raws, tested[0].config.loc.merge_iou)
    error = localise.top5_error(classes, found, truth.labels, truth.boxes, truth.bad)
    row = dict(
        protocol="top5",
        checkpoints=[net.path for net in tested],
        train_scales=[classification.train_scale_label(net.config.train_scale) for net in tested],
        test_scales=[list(net.config.loc.scales) for net in tested],
        top5_error=error,
    )
    return row, found


def format_tables(results: list[dict[str, Any]]) -> str:
    """Tables 8 and 9's layouts: the central crop's box for the ground-truth class by net, and
    the dense top-5 localisation error by net and for their union."""
    tables = []
    gt = [r for r in results if r["protocol"] == "gt_class"]
    if gt:
        header = ("localisation net", "fine-tuned layers", "regression type", "test (Q)")
        rows = [
            (
                r["checkpoint"],
                _FINE_TUNED.get(r["fine_tuned"], r["fine_tuned"]),
                r["regression"].upper(),
                str(r["test_scales"][0]),
                f"{100 * r['gt_class_error']:.1f}",
            )
            for r in gt
        ]
        tables.append(classification.text_table((*header, "GT class localisation error (%)"), rows))
    top5 = [r for r in results if r["protocol"] == "top5"]
    if top5:
        header = ("localisation net", "train (S)", "test (Q)", "top-5 localisation error (%)")
        rows = [
            (
                r["checkpoints"][0] if len(r["checkpoints"]) == 1 else "fusion",
                " and ".join(r["train_scales"]),
                " and ".join(",".join(map(str, q)) for q in r["test_scales"]),
                f"{100 * r['top5_error']:.1f}",
            )
            for r in top5
        ]
        tables.append(classification.text_table(header, rows))
    return "\n\n".join(tables)


def _run(
    net: Net,
    classifier: tuple[ml_collections.ConfigDict, Any] | None,
    source: boxes.BoxedSource,
    inputs: dict[str, np.ndarray],
) -> dict[str, Any]:
    """One localisation net's heads over the images (with the classifier's, for top5)."""
    runner = _engine(net, classifier and classifier[0])
    variables = {"loc": checkpoints.restore_params(net.path, runner.replicated)}
    if classifier is not None:
        variables["cls"] = classifier[1]
    return runner.run_source(variables, source, f"localisation net {net.path}", inputs)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The `localisation` evaluator (`--mode=eval` of an scr or pcr net): Appendix A's protocols.

    Args:
      config: `config.loc` (protocols, scales, classifier, checkpoints, merging) and the data
        set; only the 'val' images that have ground-truth boxes are tested.
      workdir: the net tested when `loc.checkpoints` is empty; localisation_results.json (and,
        for top5, boxes.npz: each image's five guesses in its own pixels) are written there.

    Returns:
      What localisation_results.json holds: a row per net and protocol (`gt_class_error`,
      Table 8; `top5_error`, Table 9, with a row for the union of several nets), and the
      images, undecodable images and seconds.

    Raises:
      UserError: no classifier for top5 (`loc.classifier` and `init_from` both empty), a
        classification net to test, or crops that differ between the two nets.
    """
    start = time.monotonic()
    source = boxes.boxed_source(config, "val")
    classification.check_classes(config, source)
    tested = nets(config, workdir)
    inputs = {"label": np.asarray(source.labels, np.int32)}
    classifier = scores = None
    if "top5" in config.loc.protocols:
        inputs["classes"], scores, variables, net = top_classes(config, source)
        classifier = (net, variables)
    truth = _Truth(inputs["label"], [source.truth(i) for i in range(len(source))], None)
    results, raws, found = [], [], None
    for net in tested:
        data = _run(net, classifier, source, inputs)
        truth = truth._replace(bad=data["bad"])
        if "gt_class" in config.loc.protocols:
            results.append(_gt_class_row(net, data["raw"], truth))
        if classifier is not None:
            raws.append([data["raw"][f"boxes_q{q}", q] for q in net.config.loc.scales])
    if classifier is not None:  # a row per net, and one for their union when there are several
        for net, raw in zip(tested, raws) if len(tested) > 1 else ():
            results.append(_top5_row([net], raw, inputs["classes"], truth)[0])
        union, found = _top5_row(tested, sum(raws, []), inputs["classes"], truth)
        results.append(union)
    summary = dict(
        model=config.model,
        dataset=config.dataset,
        checkpoints=[net.path for net in tested],
        classifier=classifier_config(config)[0] if classifier else None,
        merge_iou=config.loc.merge_iou,
        images=len(source),
        bad_images=int(truth.bad.sum()),
        seconds=round(time.monotonic() - start, 1),
        results=results,
    )
    if jax.process_index() == 0:
        print(format_tables(results))
        _write(workdir, summary, source, data["ids"], found, inputs.get("classes"), scores)
    return summary


def _write(
    workdir: str,
    summary: dict[str, Any],
    source: boxes.BoxedSource,
    ids: np.ndarray,
    found: np.ndarray | None,
    classes: np.ndarray | None,
    scores: np.ndarray | None,
) -> None:
    """localisation_results.json; with top5, boxes.npz: each image's five (class, box, score)
    guesses, boxes in its original pixels (x0, y0, x1, y1)."""
    folder = storage.at(workdir)  # a fusion's workdir may hold no run: made here
    storage.write_json(folder / "localisation_results.json", summary)
    if found is None:
        return
    sizes = np.asarray([source.size(i) for i in range(len(source))], np.float32)
    pixels = found * np.stack([sizes[:, 1], sizes[:, 0]] * 2, axis=1)[:, None]
    storage.write_npz(folder / "boxes.npz", ids=ids, classes=classes, boxes=pixels, scores=scores)
