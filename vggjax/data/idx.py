"""IDX files (the format MNIST, Fashion-MNIST, KMNIST and EMNIST ship in) to an image folder, the
layout `dataset='folder'` reads:

    python -m vggjax.data.idx --images=train-images-idx3-ubyte --labels=train-labels-idx1-ubyte \\
        --out=DATA_DIR/train
    python -m vggjax.data.idx --images=t10k-images-idx3-ubyte --labels=t10k-labels-idx1-ubyte \\
        --out=DATA_DIR/val

writes OUT/<label>/<index>.png, lossless (greyscale for (N, H, W) images). Labels name their
folders zero-padded to one width, so the sorted folder names are the labels in order. Files may be
gzipped (.gz). The format (LeCun et al.): two zero bytes, a type code, the number of dimensions,
each dimension as a big-endian uint32, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from absl import app, flags
from PIL import Image

from vggjax import cli
from vggjax.errors import UserError

# IDX type code → numpy dtype (big-endian).
DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """The array an IDX file (optionally gzipped) holds."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in DTYPES:
        raise UserError(f"{path} is not an IDX file (it starts {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(DTYPES[data[2]])
    values = np.frombuffer(data, dtype, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise UserError(f"{path}: {values.size} values for shape {shape}")
    return values.reshape(shape).astype(dtype.newbyteorder("="))


def write_folder(images: np.ndarray, labels: np.ndarray, out: str) -> None:
    """images (N, H, W) or (N, H, W, C) uint8 and labels (N,) → out/<label>/<index>.png."""
    if len(images) != len(labels):
        raise UserError(f"{len(images)} images but {len(labels)} labels")
    label_width, index_width = len(str(int(labels.max()))), len(str(len(images) - 1))
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(out, f"{int(label):0{label_width}d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{index:0{index_width}d}.png"))


FLAGS = flags.FlagValues()  # this program's own, not absl's global registry (cli.parse_flags)
_IMAGES = flags.DEFINE_string("images", "", "IDX file of the images (N, H, W).", flag_values=FLAGS)
_LABELS = flags.DEFINE_string("labels", "", "IDX file of the labels (N,).", flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    "out", "", "Folder of the split to write: DATA_DIR/train or DATA_DIR/val.", flag_values=FLAGS
)


def main(argv: list[str]) -> None:
    del argv  # cli.parse_flags refuses arguments that are not flags
    if not (_IMAGES.value and _LABELS.value and _OUT.value):
        raise UserError("give --images, --labels and --out")
    images, labels = read_idx(_IMAGES.value), read_idx(_LABELS.value)
    if images.dtype != np.uint8:
        raise UserError(f"{_IMAGES.value} holds {images.dtype} values, not uint8 pixels")
    write_folder(images, labels, _OUT.value)
    print(f"Wrote {len(images)} images in {len(np.unique(labels))} classes to {_OUT.value}")


if __name__ == "__main__":
    cli.run(
        "vggjax.data.idx", app.run, main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS)
    )
