"""Dense evaluation on images of varied sizes: cold start, steady state, padding, programs.

    python benchmarks/eval_dense.py --model=A --width=0.25 --num_images=32 --scales=224,256,288
    python benchmarks/eval_dense.py --model=D --num_images=1024 --batch_size=32 \\
        --scales=256,384,512 --dtype=bfloat16 --cache_dir=/tmp/cache --nocompare_fixed

Random images of ImageNet-like sizes (each side uniform in 300–500) are rescaled to every test
scale Q on the host beforehand (not timed), then run through the inference engine
(`vggjax.engine`: size buckets, masked dense net, flip, posteriors back on the host) as
`--mode=eval`'s multi-scale dense protocol does. images/s counts an image once for all its
scales.

- First pass, on a new engine: end to end, building every program it needs (lowering and XLA
  compilation, or loading from the persistent compilation cache with `--cache_dir`) included.
  Run twice with the same fresh `--cache_dir` for the cold and the warm-cache figures
  (`eval_cold_start.py` does, next to a PyTorch loop).
- Second pass, programs built: the steady state.
- With `--compare_fixed`, the same jitted step on one fixed shape per scale, Q × (mean width),
  about the same pixels, in full batches: what the buckets and masks cost.

`bucketed_megapixels` is what the device ran (padding and empty batch slots included), against
`valid_megapixels`, the images' own. Ends with one JSON line.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from vggjax import cli, models, recipe, sharding
from vggjax.data import augment
from vggjax.engine import Engine
from vggjax.evaluators import classification

_MODEL = flags.DEFINE_string("model", "D", "Table 1 name or alias.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel multiplier.")
_FC_WIDTH = flags.DEFINE_integer("fc_width", 4096, "FC layer width.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Images per timed pass.")
_SCALES = flags.DEFINE_list("scales", ["224", "256", "288"], "Test scales Q.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global evaluation batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_FLIP = flags.DEFINE_bool("flip", True, "Average with the mirrored image (Sect. 3.2).")
_PER_OCTAVE = flags.DEFINE_integer("buckets_per_octave", 8, "config.eval.buckets_per_octave.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Persistent compilation cache ('': none).")
_COMPILE_THREADS = flags.DEFINE_integer(
    "compile_threads", 0, "Programs compiled at once (0: auto)."
)
_AUTOTUNE = flags.DEFINE_integer(
    "autotune_level", -1, "xla_gpu_autotune_level for the programs (-1: XLA's default)."
)
_COMPARE_FIXED = flags.DEFINE_bool("compare_fixed", True, "Also time one fixed shape per Q.")
_SAVE = flags.DEFINE_string("save_posteriors", "", "Write the multi-scale posteriors (.npy).")


def config() -> Any:
    c = recipe.paper_recipe(_MODEL.value)
    c.width, c.fc_width, c.dtype, c.num_classes = _WIDTH.value, _FC_WIDTH.value, _DTYPE.value, 1000
    # Activations keep their scale through the net (with the paper's N(0, 0.01) they vanish and
    # every posterior is uniform): eval_cold_start's check against PyTorch means something.
    c.kernel_init = "he"
    c.eval.scales = tuple(int(q) for q in _SCALES.value)
    c.eval.protocols, c.eval.flip = ("multi_scale_dense",), _FLIP.value
    c.eval.batch_size, c.eval.buckets_per_octave = _BATCH.value, _PER_OCTAVE.value
    return c


def make_images(n: int, scales: tuple[int, ...], seed: int = 0) -> list[list[np.ndarray]]:
    """n random images (sides 300–500), each rescaled to every Q (on all cores: PIL's resize
    lets go of the GIL)."""
    rng = np.random.default_rng(seed)
    shapes = rng.integers(300, 501, (n, 2))
    originals = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in shapes]
    with concurrent.futures.ThreadPoolExecutor() as pool:
        return list(
            pool.map(
                lambda image: [augment.rescale_smallest_side(image, q) for q in scales], originals
            )
        )


def variables_of(model: models.VGG) -> Any:
    """The benchmark's weights: the same in every process (and in eval_cold_start's PyTorch loop)."""
    return models.init_variables(model, jax.random.key(0))


def multi_scale(out: dict[str, Any], scales: tuple[int, ...]) -> np.ndarray:
    return sum(out["raw"]["dense", q] for q in scales) / len(scales)


def fixed_shape_seconds(engine: Engine, variables: Any, images: list, c: Any) -> dict:
    """The same step on one fixed shape per scale, Q × (the images' mean width), full batches:
    seconds per pass (second pass, compiled) and the megapixels it runs."""
    step, batch = engine.steps[("dense",)], _BATCH.value
    batches, fixed, pixels = math.ceil(len(images) / batch), [], 0
    for i, q in enumerate(c.eval.scales):
        mean = sum(image[i].size // 3 for image in images) / len(images)
        width = max(q, round(mean / q / 32) * 32)
        pixels += batches * batch * q * width
        arrays = (
            np.zeros((batch, q, width, 3), np.uint8),
            np.tile(np.int32([q, width]), (batch, 1)),
        )
        fixed.append(jax.device_put((*arrays, {}), engine.batch_sharding))

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready([step(variables, *args) for args in fixed for _ in range(batches)])
        return time.perf_counter() - start

    run()  # compiles
    return dict(seconds=run(), batches=batches * len(fixed), megapixels=pixels / 1e6)


def main(argv: list[str]) -> None:
    del argv
    if _CACHE_DIR.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    c = config()
    options = {"xla_gpu_autotune_level": _AUTOTUNE.value} if _AUTOTUNE.value >= 0 else None
    engine = Engine.from_config(
        c,
        classification.plan(c),
        classification.posterior_heads(c.eval.flip),
        sharding.make_mesh(),
        compile_threads=_COMPILE_THREADS.value or None,
        compiler_options=options,
    )
    variables = jax.device_put(variables_of(engine.model), engine.replicated)
    n, scales = _NUM_IMAGES.value, tuple(c.eval.scales)
    elements = [
        dict(index=k, id=str(k), label=0, images=images)
        for k, images in enumerate(make_images(n, scales))
    ]

    def timed_pass() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        out = engine.outputs(variables, elements, n, "eval_dense")
        return time.perf_counter() - start, out

    first, out = timed_pass()
    cost = engine.cost()
    second, _ = timed_pass()
    if _SAVE.value:
        np.save(_SAVE.value, multi_scale(out, scales))
    result = describe(c, elements, out, cost, first, second)
    if _COMPARE_FIXED.value:
        fixed = fixed_shape_seconds(engine, variables, [e["images"] for e in elements], c)
        result.update(
            fixed_batches=fixed["batches"],
            fixed_megapixels=round(fixed["megapixels"], 2),
            fixed_shape_images_per_sec=round(n / fixed["seconds"], 2),
            # Pixels the device ran (padding included): what masking costs, apart from batch fill.
            bucketed_megapixels_per_sec=round(out["padded_pixels"] / 1e6 / second, 2),
            fixed_megapixels_per_sec=round(fixed["megapixels"] / fixed["seconds"], 2),
        )
    print(json.dumps(result))


def describe(
    c: Any, elements: list[dict], out: dict[str, Any], cost: dict, first: float, second: float
) -> dict[str, Any]:
    """The JSON line's figures of the bucketed passes: the settings, then the times."""
    n, scales = len(elements), tuple(c.eval.scales)
    valid = sum(image.size // 3 for e in elements for image in e["images"]) / 1e6
    return dict(
        model=c.model,
        width=c.width,
        dtype=c.dtype,
        scales=list(scales),
        flip=c.eval.flip,
        batch_size=c.eval.batch_size,
        buckets_per_octave=c.eval.buckets_per_octave,
        num_images=n,
        devices=jax.device_count(),
        platform=jax.devices()[0].platform,
        cache_dir=bool(_CACHE_DIR.value),
        **cost,  # of the first pass: compiled_shapes, cached_shapes, compile_seconds
        first_pass_seconds=round(first, 2),
        second_pass_seconds=round(second, 2),
        images_per_sec=round(n / second, 2),
        batches=out["batches"],
        valid_megapixels=round(valid, 2),
        bucketed_megapixels=round(out["padded_pixels"] / 1e6, 2),
        padding_ratio=round(out["padded_pixels"] / 1e6 / valid, 3),
    )


if __name__ == "__main__":
    cli.run("eval_dense", app.run, main)  # as every vggjax command line runs: tune_cpu first
