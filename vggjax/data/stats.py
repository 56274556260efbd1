"""Prints the mean RGB of a data set's training split, for config.mean_rgb.

Subtracting it is the paper's only input normalisation. Each image counts
equally (like the Caffe mean, computed on images warped to one size).

  python -m vggjax.data.stats --dataset=folder --data_dir=DIR
"""

from typing import Any

import grain
import ml_collections
import numpy as np
from absl import app, flags, logging

from vggjax import cli
from vggjax.data import augment, sources
from vggjax.errors import UserError

FLAGS = flags.FlagValues()  # stats' own, not absl's global registry (cli.parse_flags)
_DATASET = flags.DEFINE_string(
    "dataset", "folder", "folder, demo, imagenet2012 or tfds:NAME.", flag_values=FLAGS
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data set lives.", flag_values=FLAGS)
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", 0, "Average over this many random images (0: all).", flag_values=FLAGS
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", 0, "Decoding processes (0: in-process).", flag_values=FLAGS
)

# JPEGs are decoded at up to 1/8 size: the DCT keeps the mean colour.
_DECODE_MIN_SIDE = 32


def _image_mean(element: dict[str, Any]) -> list[float]:
    """The image's mean RGB, or NaNs when it cannot be decoded.

    A list, not an array: grain would pass arrays through shared memory.
    """
    try:
        image = augment.decode_image(element["data"], min_side=_DECODE_MIN_SIDE)
    except augment.BadImageError as e:
        logging.warning("Skipping undecodable image %s: %s", element["id"], e)
        return [np.nan] * 3
    return image.reshape(-1, 3).mean(0).tolist()


def mean_rgb(
    source: sources.Source, *, max_images: int = 0, num_workers: int = 0, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Mean RGB (0-255) over the images and the number of images it used."""
    ds = grain.MapDataset.source(source)
    if 0 < max_images < len(source):
        ds = ds.shuffle(seed)[:max_images]
    means = (
        ds.map(_image_mean)
        .to_iter_dataset()
        .mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    )
    total, count = np.zeros(3), 0
    for m in means:
        if not np.isnan(m).any():
            total, count = total + np.asarray(m), count + 1
    if not count:
        raise UserError("the training set holds no decodable images")
    return total / count, count


def main(argv: list[str]) -> None:
    del argv  # cli.parse_flags refuses arguments that are not flags
    config = ml_collections.ConfigDict({"dataset": _DATASET.value, "data_dir": _DATA_DIR.value})
    source = sources.make_source(config, "train")
    mean, count = mean_rgb(source, max_images=_MAX_IMAGES.value, num_workers=_NUM_WORKERS.value)
    logging.info("mean over %d of %d training images", count, len(source))
    print("mean_rgb=({:.3f}, {:.3f}, {:.3f})".format(*mean))


if __name__ == "__main__":
    cli.run(
        "vggjax.data.stats", app.run, main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS)
    )
