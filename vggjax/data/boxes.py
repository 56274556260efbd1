"""Ground-truth boxes for localisation (Appendix A): where they are read from, the images that
have them, and the box a training crop is taught.

Boxes are read in pixels of the stored image (pixel edges: pixel i spans [i, i + 1), so x1 and
y1 lie past the last pixel) and travel as fractions of the image's width and height, which the
rescale to S or Q leaves unchanged (`augment.Window.boxes` maps them into a crop).

- **A folder set, and the demo**: `DATA_DIR/boxes.json` beside `train/` and `val/`, one JSON
  object mapping each image's path under DATA_DIR to one box or a list of boxes, each
  `[x0, y0, x1, y1]` in pixel edges: `{"train/cat/001.jpg": [12, 30, 200, 180],
  "val/dog/7.png": [[0, 0, 50, 60], [70, 10, 120, 90]]}`. Every box is of its image's class
  (its folder); images the file does not name are left out.
- **ImageNet**: the ILSVRC-2012 bounding boxes, Pascal-VOC XML files (ILSVRC2012_bbox_train_v2
  and ILSVRC2012_bbox_val_v3) unpacked anywhere under `config.loc.annotations`. A file is named
  after its image (n01440764_10026.xml for n01440764_10026.JPEG), which matches it to a TFDS
  record by the record's `file_name`; its objects are named by synset, and only those of the
  image's class are kept. Their `xmin … ymax` are inclusive pixel indices (the ILSVRC devkit adds
  1 to each width): pixel edges `[xmin, ymin, xmax + 1, ymax + 1]`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from vggjax import localise, storage
from vggjax.data import augment, demo, sources
from vggjax.errors import UserError

BOXES_FILE = demo.BOXES_FILE  # boxes.json, beside a folder set's train/ and val/


class Annotation(NamedTuple):
    """One image's boxes (K, 4) in stored pixels, each box's class name (None: the image's own)
    and the stored (height, width) when the annotation says."""

    boxes: np.ndarray
    names: tuple[str | None, ...]
    size: tuple[int, int] | None = None


def read_boxes_json(path: str) -> dict[str, Annotation]:
    """A folder set's boxes file (the module's docstring gives its format)."""
    entries = storage.read_json(
        path,
        missing=f"no {path}: localisation on a folder set needs a boxes file mapping each "
        f'image\'s path to its boxes in pixels, e.g. {{"train/cat/001.jpg": [x0, y0, x1, y1]}}',
    )
    out = {}
    for relpath, value in entries.items():
        boxes = np.asarray(value, np.float32).reshape(-1, 4) if value else np.zeros((0, 4))
        if not np.all((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])):
            raise UserError(f"{path}: {relpath} has a box without x0 < x1 and y0 < y1: {value}")
        out[relpath] = Annotation(boxes, (None,) * len(boxes))
    return out


def parse_voc_xml(text: str | bytes) -> Annotation:
    """One Pascal-VOC annotation (the ILSVRC bounding-box files): its size and named boxes."""
    root = ElementTree.fromstring(text)
    size = root.find("size")
    shape = None
    if size is not None:
        shape = (int(float(size.findtext("height"))), int(float(size.findtext("width"))))
    boxes, names = [], []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0, y0, x1 + 1, y1 + 1))
        names.append(obj.findtext("name").strip())
    return Annotation(np.asarray(boxes, np.float32).reshape(-1, 4), tuple(names), shape)


@functools.lru_cache(maxsize=2)
def read_voc_dir(directory: str) -> dict[str, Annotation]:
    """Every `*.xml` under `directory`, by file name without its extension."""
    if not os.path.isdir(directory):
        raise UserError(
            f"config.loc.annotations {directory!r} is not a directory: unpack "
            "ILSVRC2012_bbox_train_v2.tar.gz and ILSVRC2012_bbox_val_v3.tgz into one"
        )
    out = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".xml"):
                with open(os.path.join(folder, name), "rb") as f:
                    out[name[: -len(".xml")]] = parse_voc_xml(f.read())
    logging.info("Read %d bounding-box annotations from %s.", len(out), directory)
    return out


def stored_size(data: bytes | np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image from its header alone (or of a decoded array)."""
    if isinstance(data, np.ndarray):
        return data.shape[:2]
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except (OSError, SyntaxError, ValueError) as e:
        raise augment.BadImageError(f"cannot read the image header: {e}") from e
    return height, width


class BoxedSource(sources.Source):
    """The images of `source` that have boxes of their own class, and their `labels`; each
    element also carries `boxes` (K, 4), x0, y0, x1, y1 as fractions of the image's width and
    height."""

    def __init__(
        self,
        source: sources.Source,
        annotations: dict[str, Annotation],
        key: Callable[[str], str],
        catalogue: list[tuple[str, int]],
    ):
        self.source, self.class_names = source, source.class_names
        self.indices, self.labels, self.annotations = [], [], []
        for index, (element_id, label) in enumerate(catalogue):
            found = annotations.get(key(element_id))
            if found is None:
                continue
            own = [n is None or n == self.class_names[label] for n in found.names]
            if any(own):
                self.indices.append(index)
                self.labels.append(label)
                self.annotations.append(
                    Annotation(found.boxes[own], (None,) * sum(own), found.size)
                )
        if not self.indices:
            raise UserError(
                f"none of the {len(catalogue)} images has a box of its class in the annotations"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        element = self.source[self.indices[index]]
        try:
            size = self.annotations[index].size or stored_size(element["data"])
        except augment.BadImageError:  # masked when it fails to decode; its boxes do not matter
            size = (1, 1)
        return dict(element, boxes=self._fractions(index, size))

    def _fractions(self, index: int, size: tuple[int, int]) -> np.ndarray:
        (h, w), boxes = size, self.annotations[index].boxes
        return (boxes / np.array([w, h, w, h], np.float32)).astype(np.float32)

    def size(self, index: int) -> tuple[int, int]:
        """The stored (height, width) of element `index`."""
        return self.annotations[index].size or stored_size(self.source[self.indices[index]]["data"])

    def truth(self, index: int) -> np.ndarray:
        """Element `index`'s ground-truth boxes (K, 4) as fractions of its width and height."""
        return self._fractions(index, self.size(index))


def target(window: augment.Window, boxes: np.ndarray) -> np.ndarray | None:
    """A training crop's target: of its image's boxes (fractions), the one with the largest area
    inside the crop, whole (its parts outside included), as the net's four numbers; None when
    no box shows in the crop."""
    pixels = window.boxes(boxes)
    inside = np.clip(pixels, 0, window.size)
    area = np.clip(inside[:, 2] - inside[:, 0], 0, None) * np.clip(
        inside[:, 3] - inside[:, 1], 0, None
    )
    if not len(area) or area.max() <= 0:
        return None
    return localise.encode(pixels[int(np.argmax(area))], window.size).astype(np.float32)


def _cached_catalogue(config: Any, split: str, source: sources.Source) -> list[tuple[str, int]]:
    """`source.catalogue()` of a source that must read every record for it (TFDS's), kept in the
    vggjax cache (`$VGGJAX_CACHE`, else ~/.cache/vggjax) so only the first run reads them."""
    where = os.path.abspath(os.path.expanduser(config.data_dir or "~/tensorflow_datasets"))
    digest = hashlib.sha1(f"{config.dataset}|{where}|{split}|{len(source)}".encode()).hexdigest()
    path = os.path.join(os.path.dirname(demo.default_root()), "catalogue", f"{digest[:16]}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return [tuple(entry) for entry in json.load(f)]
    logging.info(
        "Reading the file names of the %d %s images (once: cached in %s).", len(source), split, path
    )
    catalogue = source.catalogue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + f".tmp{os.getpid()}", "w", encoding="utf-8") as f:
        json.dump(catalogue, f)
    os.replace(path + f".tmp{os.getpid()}", path)
    return catalogue


def boxed_source(config: Any, split: str) -> BoxedSource:
    """The `split` of `config.dataset` restricted to images with boxes, which its elements carry."""
    source = sources.make_source(config, split)
    if isinstance(source, sources.FolderSource):  # the demo and folder sets: boxes.json
        root = os.path.dirname(source.root)
        annotations = read_boxes_json(os.path.join(root, BOXES_FILE))
        return BoxedSource(source, annotations, lambda i: f"{split}/{i}", source.catalogue())
    if not config.loc.annotations:
        raise UserError(
            f"config.loc.annotations must name the directory of the ILSVRC bounding-box XML files "
            f"for localisation on {config.dataset} (ILSVRC2012_bbox_train_v2.tar.gz and "
            "ILSVRC2012_bbox_val_v3.tgz unpacked)"
        )
    annotations = read_voc_dir(os.path.abspath(os.path.expanduser(config.loc.annotations)))
    return BoxedSource(
        source,
        annotations,
        lambda i: os.path.splitext(os.path.basename(i))[0],
        _cached_catalogue(config, split, source),
    )
