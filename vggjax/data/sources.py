"""Random-access sources of encoded images, the inputs to grain pipelines.

Every source yields `dict(data=<encoded bytes>, label=int, id=str)` so that
decoding happens where the augmentation runs (in grain workers).
Splits are named 'train' and 'val' for every data set.
"""

import abc
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


class TfdsImageNetSource(Source):
    """ILSVRC-2012 from tfds' prepared array_record files, images kept encoded."""

    def __init__(self, data_dir: str | None, split: str):
        import tensorflow_datasets as tfds

        builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise UserError(
                f"imagenet2012 is not prepared in {builder.data_dir}: put "
                "ILSVRC2012_img_{train,val}.tar in MANUAL_DIR, `pip install -e "
                ".[imagenet]`, then run `tfds build imagenet2012 "
                f"--data_dir={data_dir or '~/tensorflow_datasets'} "
                "--manual_dir=MANUAL_DIR --file_format=array_record`"
            )
        self._records = builder.as_data_source(
            split={"train": "train", "val": "validation"}[split],
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        self.class_names = tuple(builder.info.features["label"].names)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        name = record["file_name"]
        return {
            "data": record["image"],
            "label": int(record["label"]),
            "id": name.decode() if isinstance(name, bytes) else str(name),
        }


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
    return TfdsImageNetSource(data_dir or None, split)


# config.dataset → its source of (data_dir, split); options.DATASETS are these names.
SOURCES: dict[str, Callable[[str, str], Source]] = {
    "imagenet2012": _imagenet,
    "folder": _folder,
    "demo": _demo,
}
SPLITS = ("train", "val")


def make_source(config: Any, split: str) -> Source:
    """The `split` ('train' or 'val') of `config.dataset` in `config.data_dir`."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if config.dataset not in SOURCES:
        raise UserError(f"unknown dataset {config.dataset!r}; choose one of {tuple(SOURCES)}")
    return SOURCES[config.dataset](config.data_dir, split)
