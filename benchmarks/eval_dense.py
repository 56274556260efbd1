"""Dense evaluation throughput on images of varied sizes, next to one fixed shape.

    python benchmarks/eval_dense.py --model=D --width=0.25 --scales=224,256,288 --num_images=32
    python benchmarks/eval_dense.py --model=D --num_images=1024 --batch_size=32

Random images of ImageNet-like sizes (each side uniform in 300–500) are rescaled to every test
scale Q on the host beforehand, then timed through the inference engine (`vggjax.inference`: padding to size buckets,
masked dense net, flip, posteriors back on the host): images/s counts an image once for all its
scales. The comparison runs the same jitted step on one fixed shape per scale, Q × (mean width),
holding about the same pixels, in full batches. Both are timed on a second pass, after
compilation. Ends with one JSON line.

With few images most (scale, bucket) groups fill only part of a batch, so the bucketed pass runs
more padded pixels (`bucketed_megapixels`) than a whole validation set would per image; the
megapixels/s figures separate that from the cost of the masks.
"""

from __future__ import annotations

import collections
import json
import math
import time

import jax
import numpy as np
from absl import app, flags

from vggjax import evaluate, inference, models, recipe, train
from vggjax.data import augment

_MODEL = flags.DEFINE_string("model", "D", "Table 1 name or alias.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel multiplier.")
_FC_WIDTH = flags.DEFINE_integer("fc_width", 4096, "FC layer width.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Images per timed pass.")
_SCALES = flags.DEFINE_list("scales", ["224", "256", "288"], "Test scales Q.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global evaluation batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_FLIP = flags.DEFINE_bool("flip", True, "Average with the mirrored image (Sect. 3.2).")


def timed(run) -> float:
    run()  # compiles
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    c = recipe.paper_recipe(_MODEL.value)
    c.width, c.fc_width, c.dtype, c.num_classes = _WIDTH.value, _FC_WIDTH.value, _DTYPE.value, 1000
    c.eval.scales = tuple(int(q) for q in _SCALES.value)
    c.eval.protocols, c.eval.flip = ("multi_scale_dense",), _FLIP.value
    c.eval.batch_size = _BATCH.value
    evaluator = evaluate.engine(c, train.make_mesh())
    variables = jax.device_put(
        models.init_variables(evaluator.model, jax.random.key(0)), evaluator.replicated
    )
    rng = np.random.default_rng(0)
    n = _NUM_IMAGES.value
    elements = []
    for k in range(n):
        image = rng.integers(0, 256, (*rng.integers(300, 501, 2), 3), dtype=np.uint8)
        elements.append(
            dict(
                index=k,
                id=str(k),
                label=0,
                images=[augment.rescale_smallest_side(image, q) for q in c.eval.scales],
            )
        )
    bucketed = timed(lambda: evaluator.outputs(variables, elements, n))

    step = evaluator.steps[("dense",)]
    batches = math.ceil(n / _BATCH.value)
    valid_pixels, fixed_pixels, fixed = 0, 0, []
    for i, q in enumerate(c.eval.scales):
        pixels = sum(e["images"][i].shape[0] * e["images"][i].shape[1] for e in elements)
        width = max(q, round(pixels / n / q / 32) * 32)
        valid_pixels += pixels
        fixed_pixels += batches * _BATCH.value * q * width
        images = jax.device_put(
            np.zeros((_BATCH.value, q, width, 3), np.uint8), evaluator.batch_sharding
        )
        sizes = jax.device_put(
            np.tile(np.int32([q, width]), (_BATCH.value, 1)), evaluator.batch_sharding
        )
        fixed.append((images, sizes))

    def fixed_pass():
        jax.block_until_ready([step(variables, *batch) for batch in fixed for _ in range(batches)])

    fixed_seconds = timed(fixed_pass)
    counts = collections.Counter(
        (q, inference.bucket_shape(*e["images"][i].shape[:2], c.eval.bucket_multiple))
        for e in elements
        for i, q in enumerate(c.eval.scales)
    )
    bucketed_batches = {key: math.ceil(count / _BATCH.value) for key, count in counts.items()}
    bucketed_pixels = sum(b * _BATCH.value * h * w for (_, (h, w)), b in bucketed_batches.items())
    result = dict(
        model=c.model,
        width=c.width,
        dtype=c.dtype,
        scales=list(c.eval.scales),
        flip=c.eval.flip,
        batch_size=_BATCH.value,
        num_images=n,
        devices=jax.device_count(),
        platform=jax.devices()[0].platform,
        compiled_shapes=len(evaluator.compiled),
        bucketed_batches=sum(bucketed_batches.values()),
        fixed_batches=batches * len(fixed),
        valid_megapixels=round(valid_pixels / 1e6, 2),
        bucketed_megapixels=round(bucketed_pixels / 1e6, 2),
        fixed_megapixels=round(fixed_pixels / 1e6, 2),
        images_per_sec=round(n / bucketed, 2),
        fixed_shape_images_per_sec=round(n / fixed_seconds, 2),
        # Pixels the device ran (padding included): what masking costs, apart from batch fill.
        bucketed_megapixels_per_sec=round(bucketed_pixels / 1e6 / bucketed, 2),
        fixed_megapixels_per_sec=round(fixed_pixels / 1e6 / fixed_seconds, 2),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
