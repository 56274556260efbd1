"""`config.dataset = "tfds:NAME"`: a TFDS data set prepared here from local images (no download,
no TensorFlow: the images are given encoded), read by name like a user's prepared cifar10."""

import io
import json

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from helpers import run_main

from vggjax.data import augment, sources

CLASSES = ("red", "green", "blue")
SIZE = 32


def _image(index: int, label: int) -> np.ndarray:
    """A flat image in its class's colour channel, as bright as 100 + its index."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., label] = 100 + index
    return image


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


with tfds.core.registered.skip_registration():  # read back from its files, as a user's would be

    class TinyColours(tfds.core.GeneratorBasedBuilder):
        """Three classes of flat colour images: 'train' (24) and 'test' (6) splits."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self, features=features, supervised_keys=("image", "label")
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24), "test": self._generate_examples(6)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"image": _png(_image(i, i % 3)), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyColours(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _config(data_dir, dataset="tfds:tiny_colours"):
    return ml_collections.ConfigDict({"dataset": dataset, "data_dir": data_dir})


def test_the_source_yields_its_images_labels_and_class_names(tfds_dir):
    train = sources.make_source(_config(tfds_dir), "train")
    val = sources.make_source(_config(tfds_dir, "tfds:tiny_colours:1.0.0"), "val")  # its 'test'
    assert train.class_names == CLASSES and val.class_names == CLASSES
    assert (len(train), len(val)) == (24, 6)
    element = train[7]
    assert isinstance(element["data"], bytes)  # kept encoded: decoded in the grain workers
    assert element["id"] == "train/7"
    made = []  # tfds stores the examples shuffled: each image is told by its brightness
    for source in (train, val):
        for element in map(source.__getitem__, range(len(source))):
            image = augment.decode_image(element["data"])
            index = int(image[0, 0, element["label"]]) - 100
            np.testing.assert_array_equal(image, _image(index, index % 3))
            made.append(index)
    assert sorted(made) == sorted([*range(24), *range(6)])
    assert sources.train_classes(_config(tfds_dir)) == CLASSES


def test_mistakes_get_one_line(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="tfds build cifar10 --data_dir=") as e:
        sources.make_source(_config(str(tmp_path), "tfds:cifar10"), "train")  # nothing downloaded
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="TFDS data set 'nope' is not prepared"):
        sources.make_source(_config(tfds_dir, "tfds:nope"), "train")
    with pytest.raises(ValueError, match=r"unknown dataset 'tfds:'; .*'tfds:NAME\[:VERSION\]'"):
        sources.make_source(_config(tfds_dir, "tfds:"), "train")
    builder = sources.tfds_builder("tiny_colours", tfds_dir)
    builder.info.splits.pop("test")  # a data set with no split to validate on
    with pytest.raises(ValueError, match=r"no validation or test split .* splits are \('train',\)"):
        sources.tfds_split(builder, "val")


def test_training_by_name_records_the_class_names(tfds_dir, tmp_path):
    """The command line takes num_classes from the label feature and records its names."""
    workdir = tmp_path / "run"
    result = run_main(
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.dataset=tfds:tiny_colours",
        f"--config.data_dir={tfds_dir}",
        "--config.width=0.0625",
        "--config.fc_width=32",
        "--config.batch_size=8",
        "--config.num_workers=0",
        "--config.num_train_steps=2",
        "--config.mean_rgb=(50.0, 50.0, 50.0)",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val: top-1 err" in result.stderr  # on its 'test' split
    written = json.loads((workdir / "config.json").read_text())
    assert written["num_classes"] == 3
    assert [c["name"] for c in written["classes"]] == list(CLASSES)


def test_an_unprepared_data_set_is_one_line_and_status_2(tmp_path):
    result = run_main(
        "--config=configs/demo.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=tfds:cifar10",
        f"--config.data_dir={tmp_path}",
        XLA_FLAGS="",
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "'cifar10' is not prepared" in lines[0] and "tfds build cifar10" in lines[0]
