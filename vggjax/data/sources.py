"""Random-access sources of encoded images, the inputs to grain pipelines.

Every source yields `dict(data=<encoded bytes>, label=int, id=str)` so that
decoding happens where the augmentation runs (in grain workers).
Splits are named 'train' and 'val' for every data set (a TFDS data set's 'val' is its own
'validation' split, else its 'test').
"""

import abc
import logging
import os
from collections.abc import Callable
from typing import Any

from vggjax.data import demo
from vggjax.errors import UserError


class Source(abc.ABC):
    """A labelled image collection with random access."""

    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def catalogue(self) -> list[tuple[str, int]]:
        """Each element's (id, label), in order; reads every element unless the source knows."""
        return [(e["id"], e["label"]) for e in map(self.__getitem__, range(len(self)))]


class FolderSource(Source):
    """`<split_dir>/<class>/<file>`: classes are the sorted subfolder names."""

    def __init__(self, split_dir: str):
        layout = f"expected {split_dir}/<class>/<image files>"
        self.root = split_dir
        self.class_names = class_folders(split_dir)
        self.files = tuple(
            (f"{name}/{e.name}", label)
            for label, name in enumerate(self.class_names)
            for e in sorted(os.scandir(os.path.join(split_dir, name)), key=lambda e: e.name)
            if e.is_file() and not e.name.startswith(".")
        )
        if not self.files:
            raise UserError(f"{split_dir} holds no image files: {layout}")

    def __len__(self) -> int:
        return len(self.files)

    def catalogue(self) -> list[tuple[str, int]]:
        return list(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        relpath, label = self.files[index]
        with open(os.path.join(self.root, relpath), "rb") as f:
            return {"data": f.read(), "label": label, "id": relpath}


def class_folders(split_dir: str) -> tuple[str, ...]:
    """The classes of `<split_dir>/<class>/<file>`: its subfolders' names, sorted. Reads the
    folder only, not the files (ImageNet's training folder holds 1.28 million)."""
    if not os.path.isdir(split_dir):
        raise UserError(
            f"{split_dir} is not a directory: expected {split_dir}/<class>/<image files>"
        )
    return tuple(
        sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    )


class TfdsSource(Source):
    """A prepared TFDS image-classification data set, read with random access from its
    array_record files (no TensorFlow), images kept encoded: decoded in the grain workers."""

    def __init__(self, name: str, data_dir: str | None, split: str, how_to_prepare: str = ""):
        import tensorflow_datasets as tfds

        builder = tfds_builder(name, data_dir, how_to_prepare)
        image, label = builder.info.supervised_keys or ("image", "label")
        self._keys, self._split = (image, label), tfds_split(builder, split)
        features = dict(builder.info.features.items())
        if not isinstance(features.get(label), tfds.features.ClassLabel):
            raise UserError(
                f"TFDS data set {name!r} has no class label {label!r}: not classification"
            )
        self._ids = "file_name" in features  # ImageNet's; else split/index
        self.class_names = tuple(features[label].names)
        try:
            self._records = builder.as_data_source(
                split=self._split, decoders={image: tfds.decode.SkipDecoding()}
            )
        except NotImplementedError:  # prepared, but not as array_record
            raise UserError(
                f"TFDS data set {name!r} in {builder.data_dir} is not in array_record files, "
                "which random access needs: prepare it again with --file_format=array_record"
            ) from None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        name = record["file_name"] if self._ids else f"{self._split}/{index}"
        return {
            "data": record[self._keys[0]],
            "label": int(record[self._keys[1]]),
            "id": name.decode() if isinstance(name, bytes) else str(name),
        }


def tfds_builder(name: str, data_dir: str | None, how_to_prepare: str = "") -> Any:
    """The builder of TFDS data set `name` ('NAME' or 'NAME:VERSION') as prepared in `data_dir`.
    UserError saying how to prepare it when it is not: nothing is downloaded at run time."""
    import tensorflow_datasets as tfds

    where = data_dir or "~/tensorflow_datasets"
    base = name.split(":")[0]
    how = how_to_prepare or (
        f"`tfds build {base} --data_dir={where} --file_format=array_record` (or in Python "
        f"tfds.builder({base!r}, data_dir={where!r}, file_format='array_record')"
        ".download_and_prepare())"
    )
    unprepared = UserError(f"TFDS data set {name!r} is not prepared in {where}: run {how}")
    absl = logging.getLogger("absl")  # tfds warns of a missing dataset_info.json: the error
    level = absl.level  # below says it in one line
    absl.setLevel(logging.ERROR)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    except (tfds.core.registered.DatasetNotFoundError, AssertionError):  # AssertionError:
        raise unprepared from None  # a version the installed tfds does not have
    finally:
        absl.setLevel(level)
    if not prepared:
        raise unprepared
    return builder


def tfds_split(builder: Any, split: str) -> str:
    """The data set's own split for 'train' or 'val' (its 'validation', else its 'test')."""
    wanted = {"train": ("train",), "val": TFDS_VAL_SPLITS}[split]
    have = tuple(builder.info.splits)
    for name in wanted:
        if name in have:
            return name
    raise UserError(
        f"TFDS data set {builder.name!r} has no {' or '.join(wanted)} split for {split!r}; "
        f"its splits are {have}"
    )


def folder_split(data_dir: str, split: str) -> str:
    """`data_dir`'s folder of `split`, for dataset 'folder'."""
    if not data_dir or not os.path.isdir(data_dir):
        raise UserError(
            f"data_dir {data_dir!r} is not a directory: dataset 'folder' expects "
            "DATA_DIR/{train,val}/<class>/<image files>"
        )
    return os.path.join(data_dir, split)


def _folder(data_dir: str, split: str) -> Source:
    return FolderSource(folder_split(data_dir, split))


def _demo(data_dir: str, split: str) -> Source:
    return FolderSource(os.path.join(demo.ensure_demo_dataset(data_dir or None), split))


def _imagenet(data_dir: str, split: str) -> Source:
    return TfdsSource("imagenet2012", data_dir or None, split, _IMAGENET_HOW)


_IMAGENET_HOW = (
    "`pip install -e .[imagenet]`, put ILSVRC2012_img_{train,val}.tar in MANUAL_DIR, then "
    "`tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL_DIR "
    "--file_format=array_record`"
)


# config.dataset → its source of (data_dir, split); DATASETS are these names and tfds:NAME.
SOURCES: dict[str, Callable[[str, str], Source]] = {
    "imagenet2012": _imagenet,
    "folder": _folder,
    "demo": _demo,
}
SPLITS = ("train", "val")
# `tfds:NAME` (or `tfds:NAME:VERSION`): any prepared TFDS image-classification data set.
TFDS_PREFIX = "tfds:"
# A TFDS data set's split read as 'val': the first of these it has.
TFDS_VAL_SPLITS = ("validation", "test")
# What config.dataset may be, as the one-line error for an unknown one lists it.
DATASETS = (*SOURCES, f"{TFDS_PREFIX}NAME[:VERSION]")


def known_dataset(name: str) -> bool:
    """Whether config.dataset `name` is one of `DATASETS`."""
    return name in SOURCES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX))


def train_classes(config: Any) -> tuple[str, ...] | None:
    """The class names of a folder's or a TFDS data set's training split, read without listing
    its images (a folder's subfolders, a TFDS label feature); None for ImageNet and the demo,
    whose configs give their number of classes."""
    if config.dataset == "folder":
        classes = class_folders(folder_split(config.data_dir, "train"))
        return classes or make_source(config, "train").class_names  # says what the folder lacks
    if config.dataset.startswith(TFDS_PREFIX):
        return make_source(config, "train").class_names
    return None


def make_source(config: Any, split: str) -> Source:
    """The `split` ('train' or 'val') of `config.dataset` in `config.data_dir`."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if not known_dataset(config.dataset):
        raise UserError(f"unknown dataset {config.dataset!r}; choose one of {DATASETS}")
    if config.dataset.startswith(TFDS_PREFIX):
        return TfdsSource(config.dataset.removeprefix(TFDS_PREFIX), config.data_dir or None, split)
    return SOURCES[config.dataset](config.data_dir, split)
