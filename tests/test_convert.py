"""vggjax.convert and load_pretrained: published layouts give the outputs of their own libraries.

References: keras.applications (JAX backend) reading the h5 files with Keras's own loader; torch
(when installed) reading torch.save's files; and, with no torch, torchvision's forward pass
written in NCHW with jax.lax (convert_files.py, which writes the files too). Narrow nets
everywhere but one full VGG16.
"""

import os
import pickle
import re
import subprocess
import sys
import types
import zipfile

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported, whatever ~/.keras/keras.json says

import jax
import numpy as np
import pytest
import safetensors.torch
from convert_files import (
    CFG,
    NARROW,
    caffe_net_parameter,
    images,
    keras_layers,
    nchw_forward,
    relative_difference,
    timm_state,
    torch_logits,
    torch_vgg,
    torchvision_state,
    write_caffemodel,
    write_keras_h5,
    write_torch,
    write_torch_layout,
)
from helpers import ROOT

import vggjax
from vggjax import checkpoints, convert, models, pretrained, recipe
from vggjax.errors import UserError

# The Caffe release's layout -------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False])
def test_caffe_release_layout_matches_its_forward_pass(tmp_path, legacy):
    """Files serialised by protobuf in the official caffe.proto's messages (BVLC's schema as protoc
    compiled it for the `mmdnn` package: convert_files.caffe_net_parameter), not in descriptors
    written by the test, in both layer formats: every weight and bias comes back exactly, and
    the converted net gives the Caffe release's forward pass."""
    state = torchvision_state(CFG["D"], **NARROW)
    path = str(tmp_path / "vgg16.caffemodel")
    write_caffemodel(path, state, CFG["D"], legacy)
    convs, fcs = convert.read_layers("caffe", path)
    conv_keys = [k for k in state if k.startswith("features.") and k.endswith(".weight")]
    for layer, key in zip(convs, conv_keys, strict=True):  # OIHW → HWIO
        assert np.array_equal(layer.kernel, state[key].transpose(2, 3, 1, 0))
        assert np.array_equal(layer.bias, state[key.replace(".weight", ".bias")])
    fc6 = state["classifier.0.weight"]  # its columns flattened NCHW → vggjax's NHWC
    channels, window = convs[-1].kernel.shape[-1], NARROW["window"]
    kernels = [
        fc6.reshape(-1, channels, window, window).transpose(2, 3, 1, 0).reshape(-1, len(fc6)),
        state["classifier.3.weight"].T,
        state["classifier.6.weight"].T,
    ]
    for layer, kernel, j in zip(fcs, kernels, (0, 3, 6), strict=True):
        assert np.array_equal(layer.kernel, kernel)
        assert np.array_equal(layer.bias, state[f"classifier.{j}.bias"])
    config = convert.convert("caffe", path, "D", str(tmp_path / "o"))
    assert config["mean_rgb"] == [123.68, 116.779, 103.939]
    assert (config["model"], config["num_classes"], config["crop_size"]) == ("D", 10, 64)
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "o"))
    rgb = images(2, 64)
    assert (
        relative_difference(
            model.apply(variables, preprocess(rgb)), nchw_forward(state, CFG["D"], rgb, caffe=True)
        )
        < 1e-5
    )


def test_bad_caffemodels_are_named(tmp_path, capsys):
    state = torchvision_state(CFG["D"], **NARROW)
    write_caffemodel(tmp_path / "w.caffemodel", state, CFG["D"])
    data = (tmp_path / "w.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) * 9 // 10])
    assert "truncated .caffemodel" in _convert_error(tmp_path, "caffe", tmp_path / "cut.caffemodel")
    net_class = caffe_net_parameter()
    full, gap = net_class.FromString(data), net_class()
    gap.layers.extend(layer for layer in full.layers if layer.name != "conv3_1")
    (tmp_path / "gap.caffemodel").write_bytes(gap.SerializeToString())
    assert "has 12 conv layers (conv1_1 … conv5_3); model D has 13" in _convert_error(
        tmp_path, "caffe", tmp_path / "gap.caffemodel"
    )
    (tmp_path / "empty.caffemodel").write_bytes(net_class(name="x").SerializeToString())
    assert "no convolution layers found" in _convert_error(
        tmp_path, "caffe", tmp_path / "empty.caffemodel"
    )
    with pytest.raises(SystemExit) as e:
        convert.main(
            [
                "--from=caffe",
                str(tmp_path / "w.caffemodel"),
                "--model=D",
                "--verify",
                f"--output={tmp_path / 'v'}",
            ]
        )
    assert (
        e.value.code == 2
        and "--verify has no reference for --from=caffe" in capsys.readouterr().err
    )


# Keras's layout ----------------------------------------------------------------------------------


@pytest.fixture
def keras(monkeypatch):
    """keras on JAX, its random init skipped: the weights come from files (138M draws: 8 s)."""
    import keras

    assert keras.backend.backend() == "jax", "keras was imported with another backend"
    monkeypatch.setattr(
        keras.initializers.GlorotUniform,
        "__call__",
        lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype),
    )
    return keras


# Parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,fmt",
    [
        ("torchvision", "zip"),
        ("torchvision", "legacy"),
        ("torchvision", "safetensors"),
        ("timm", "safetensors"),
    ],
)
def test_torch_layouts_match_torchvisions_forward_pass(tmp_path, source, fmt):
    state = torchvision_state(CFG["D"], **NARROW)
    file_state = timm_state(state, 32, 2) if source == "timm" else state
    write_torch_layout(tmp_path / "w", file_state, fmt)
    config = convert.convert(source, str(tmp_path / "w"), "vgg16", str(tmp_path / "out"))
    assert config["mean_rgb"] == [123.675, 116.28, 103.53]
    assert (config["model"], config["num_classes"], config["crop_size"]) == ("D", 10, 64)
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "out"))
    rgb = images(2, 64)
    assert (
        relative_difference(
            model.apply(variables, preprocess(rgb)), nchw_forward(state, CFG["D"], rgb)
        )
        < 1e-5
    )
    if fmt != "safetensors":  # the files written here are what torch itself reads
        import torch

        loaded = torch.load(tmp_path / "w", weights_only=True)
        assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())


@pytest.mark.parametrize("source,fmt", [("torchvision", "zip"), ("timm", "safetensors")])
def test_batch_norm_nets_convert_with_their_statistics(tmp_path, source, fmt):
    """vgg16_bn: each BN's scale and shift become conv*_bn's parameters, its running
    statistics batch_stats; the logits equal torchvision's eval-mode forward pass."""
    state = torchvision_state(CFG["D"], **NARROW, batch_norm=True)
    file_state = timm_state(state, 32, 2) if source == "timm" else state
    write_torch_layout(tmp_path / "w", file_state, fmt)
    config = convert.convert(source, str(tmp_path / "w"), "vgg16_bn", str(tmp_path / "out"))
    assert config["model"] == "vgg16_bn"
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "out"))
    assert model.batch_norm and set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv5_3_bn"]["var"], state["features.41.running_var"]
    )
    rgb = images(2, 64)
    assert (
        relative_difference(
            model.apply(variables, preprocess(rgb)),
            nchw_forward(state, CFG["D"], rgb, batch_norm=True),
        )
        < 1e-5
    )
    assert "convert it with --model=vgg16_bn" in _convert_error(
        tmp_path / "e1", source, tmp_path / "w"
    )
    write_torch(tmp_path / "plain.pth", torchvision_state(CFG["D"], **NARROW))
    assert "has a batch norm after every conv, but features.0 has none" in _convert_error(
        tmp_path / "e2", "torchvision", tmp_path / "plain.pth", "vgg16_bn"
    )


def test_torch_batch_norm_net_matches_torch(tmp_path, monkeypatch):
    import torch

    net = torch_vgg(CFG["D"], **NARROW, batch_norm=True)
    torch.save(net.state_dict(), tmp_path / "vgg16_bn.pth")
    convert.convert("torchvision", str(tmp_path / "vgg16_bn.pth"), "vgg16_bn", str(tmp_path / "o"))
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "o"))
    rgb = images(2, 64)
    assert (
        relative_difference(model.apply(variables, preprocess(rgb)), torch_logits(net, rgb)) < 1e-5
    )
    stub = types.SimpleNamespace(models=types.SimpleNamespace(vgg16_bn=lambda num_classes: net))
    monkeypatch.setitem(sys.modules, "torchvision", stub)  # --verify builds vgg16_bn
    difference, _ = convert.verify(
        str(tmp_path / "o"), convert.reference("torchvision", str(tmp_path / "vgg16_bn.pth"))
    )
    assert difference < 1e-5


def test_torch_saved_files_match_torch(tmp_path, monkeypatch, capsys):
    import torch

    net = torch_vgg(CFG["D"], **NARROW)
    rgb = images(2, 64)
    for fmt in ("zip", "legacy", "safetensors"):
        path = str(tmp_path / f"vgg16.{fmt}")
        if fmt == "safetensors":
            safetensors.torch.save_file(net.state_dict(), path)
        else:
            torch.save(net.state_dict(), path, _use_new_zipfile_serialization=fmt == "zip")
        convert.convert("torchvision", path, "D", str(tmp_path / fmt))
        model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / fmt))
        difference = relative_difference(
            model.apply(variables, preprocess(rgb)), torch_logits(net, rgb)
        )
        print(f"torch.save {fmt}: relative difference {difference:.1e}")
        assert difference < 1e-5
    # --verify's torchvision path, with this narrow net standing in for torchvision's vgg16.
    stub = types.SimpleNamespace(models=types.SimpleNamespace(vgg16=lambda num_classes: net))
    monkeypatch.setitem(sys.modules, "torchvision", stub)
    difference, what = convert.verify(
        str(tmp_path / "zip"), convert.reference("torchvision", str(tmp_path / "vgg16.zip"))
    )
    assert difference < 1e-5 and what == "logits of 2 random 64×64 images"


@pytest.mark.parametrize("top", [True, False])
def test_keras_vgg19_matches_keras(tmp_path, keras, top):
    """Keras 3 writing the legacy h5 layout itself (model.save), with the top and without."""
    net = keras.applications.VGG19(
        weights=None, include_top=top, input_shape=(32, 32, 3), classifier_activation=None
    )
    net.set_weights([w for _, layer in keras_layers(CFG["E"], window=1, top=top) for w in layer])
    net.save(tmp_path / "vgg19.h5")
    config = convert.convert("keras", str(tmp_path / "vgg19.h5"), "E", str(tmp_path / "out"))
    assert config["mean_rgb"] == [123.68, 116.779, 103.939]
    assert config["pretrained"]["include_top"] is top and ("num_classes" in config) is top
    names = pretrained.class_names(str(tmp_path / "out"))  # ILSVRC-2012's, with the top
    assert ("classes" in config) is top and names[:1] == ((("n01440764", "tench"),) if top else ())
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "out"))
    assert ("fc6" in variables["params"]) is top and len(variables["params"]) == 16 + 3 * top
    rgb = images(2, 32)
    want = np.asarray(net(keras.applications.vgg19.preprocess_input(rgb.copy())))
    got = (
        model.apply(variables, preprocess(rgb))
        if top
        else pretrained.conv_features(model, variables, preprocess(rgb))
    )
    assert want.shape == ((2, 1000) if top else (2, 1, 1, 512))
    assert relative_difference(got, want) < 1e-5


def test_full_vgg16_in_the_published_layout_verifies_against_keras(tmp_path, keras, capsys):
    """The one full-size net: a file laid out as vgg16_weights_tf_dim_ordering_tf_kernels.h5,
    converted and checked with `--verify` (Keras's own loader and preprocess_input)."""
    write_keras_h5(tmp_path / "vgg16.h5", keras_layers(CFG["D"]), chunks=2)
    convert.main(
        [
            "--from=keras",
            str(tmp_path / "vgg16.h5"),
            "--model=D",
            "--verify",
            f"--output={tmp_path / 'out'}",
        ]
    )
    out = capsys.readouterr().out
    assert "Wrote VGG D (with the top)" in out and "(123.68, 116.779, 103.939)" in out
    assert "over the logits of 2 random 224×224 images" in out
    with capsys.disabled():
        print("\n" + out.strip().splitlines()[-1])
    model, variables, _ = pretrained.load_pretrained(str(tmp_path / "out"))
    assert models.count_params(variables["params"]) == 138_357_544


def test_load_pretrained_reads_a_training_workdir(tmp_path):
    c = recipe.paper_recipe("vgg11_bn")
    c.width, c.fc_width, c.num_classes, c.crop_size = 1 / 16, 16, 10, 32
    c.mean_rgb = (100.0, 110.0, 120.0)
    model = models.model_from_config(c)
    rng = np.random.default_rng(0)  # positive values: BN variances among them
    variables = jax.tree.map(
        lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), models.abstract_variables(model)
    )
    checkpoints.save_params(str(tmp_path), variables)
    (tmp_path / "config.json").write_text(c.to_json_best_effort())  # as training writes it
    rgb = images(2, 32)
    want = model.apply(variables, rgb - np.float32(c.mean_rgb))
    for path in (tmp_path, tmp_path / "checkpoints" / "0"):
        loaded, loaded_variables, preprocess = vggjax.load_pretrained(str(path))
        assert loaded == model and set(loaded_variables) == {"params", "batch_stats"}
        np.testing.assert_allclose(loaded.apply(loaded_variables, preprocess(rgb)), want, atol=1e-6)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no config.json in .*: it tells the model"):
        pretrained.load_pretrained(str(tmp_path))


# Bad files: one line naming the problem ----------------------------------------------------------


def _convert_error(tmp_path, source, path, model="D") -> str:
    with pytest.raises(UserError) as e:
        convert.convert(source, str(path), model, str(tmp_path / "out"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    return str(e.value)


def test_keras_files_of_the_wrong_model_or_missing_layers(tmp_path):
    layers = keras_layers(CFG["D"], divisor=16, fc=16, classes=10, window=1)
    write_keras_h5(tmp_path / "d.h5", layers)
    assert "has 13 conv layers (block1_conv1 … block5_conv3); model E has 16" in _convert_error(
        tmp_path, "keras", tmp_path / "d.h5", "E"
    )
    write_keras_h5(tmp_path / "gap.h5", [layer for layer in layers if layer[0] != "block4_conv2"])
    assert "has 12 conv layers" in _convert_error(tmp_path, "keras", tmp_path / "gap.h5")
    bad = [
        (name, [w[:, :-1] if name == "fc2" and w.ndim == 2 else w for w in weights])
        for name, weights in layers
    ]
    write_keras_h5(tmp_path / "shape.h5", bad)
    assert "fc2 (fc7) has kernel and bias shapes ((16, 15), (16,))" in _convert_error(
        tmp_path, "keras", tmp_path / "shape.h5"
    )
    assert "vggjax_bn" not in _convert_error(tmp_path, "keras", tmp_path / "d.h5", "vgg16_bn")


def test_torch_files_with_wrong_shapes_layers_or_layout(tmp_path):
    state = torchvision_state(CFG["D"], **NARROW)
    write_torch(tmp_path / "timm.pth", timm_state(state, 32, 2))
    assert "unexpected tensor pre_logits.fc1.weight" in _convert_error(
        tmp_path, "torchvision", tmp_path / "timm.pth"
    )
    write_torch(tmp_path / "gap.pth", {k: v for k, v in state.items() if "features.10." not in k})
    assert "has 12 conv layers (features.0 … features.28); model D has 13" in _convert_error(
        tmp_path, "torchvision", tmp_path / "gap.pth"
    )
    write_torch(tmp_path / "fc.pth", {k: v for k, v in state.items() if "classifier.3" not in k})
    assert "FC layer classifier.3 (fc7) is missing" in _convert_error(
        tmp_path, "torchvision", tmp_path / "fc.pth"
    )
    write_torch(tmp_path / "shape.pth", {**state, "classifier.6.bias": np.zeros(9, np.float32)})
    assert "classifier.6 (fc8) has kernel and bias shapes ((16, 10), (9,))" in _convert_error(
        tmp_path, "torchvision", tmp_path / "shape.pth"
    )
    assert "not an HDF5 file" in _convert_error(tmp_path, "keras", tmp_path / "shape.pth")


def test_truncated_files_are_named(tmp_path):
    state = torchvision_state(CFG["D"], **NARROW)
    write_torch(tmp_path / "legacy.pth", state, legacy=True)
    write_torch(tmp_path / "zip.pth", state)
    write_torch_layout(tmp_path / "w.safetensors", state, "safetensors")
    write_keras_h5(tmp_path / "w.h5", keras_layers(CFG["D"], divisor=16, fc=16, window=1))
    messages = {}
    for name in ("legacy.pth", "zip.pth", "w.safetensors", "w.h5"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) * 9 // 10])
        messages[name] = _convert_error(
            tmp_path, "keras" if name == "w.h5" else "torchvision", tmp_path / name
        )
    assert re.search(
        r"the data of features\.\d+\.weight is missing or cut short", messages["legacy.pth"]
    )
    assert "not a complete zip archive (a truncated .pth file?)" in messages["zip.pth"]
    assert re.search(r"the data of features\.\d+\.weight is cut short", messages["w.safetensors"])
    assert "not a readable HDF5 file" in messages["w.h5"]


def test_pickles_of_anything_but_tensors_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"features.0.weight": Payload()}, protocol=2))
    message = _convert_error(tmp_path, "torchvision", tmp_path / "evil.pth")
    assert "holds a pickled posix.system, not only tensors; refusing to unpickle it" in message
    assert not (tmp_path / "ran").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vggjax.convert",
            "--from=torchvision",
            "nope.pth",
            "--model=D",
            "--output=o",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == "vggjax.convert: error: cannot read nope.pth: No such file or directory\n"
    for args, message in [
        (["--from=tensorflow", "w.pth", "--model=D", "--output=o"], "argument --from: invalid"),
        (["--from=onnx", "w.pth", "--output=o"], "w.pth is not a readable ONNX file"),
        (["--from=caffe", "w.pth", "--model=D", "--output=o"], "w.pth: not a Caffe .caffemodel"),
        (["--from=torchvision", "w.pth", "--output=o"], "--model is required for a file"),
        (["--from=torchvision", "w.pth", "--model=F", "--output=o"], "unknown model 'F'"),
        (["--from=torchvision", "w.pth", "--model=D", "--output=full"], "not an empty dir"),
    ]:
        with pytest.raises(SystemExit) as e:
            convert.main(
                [
                    a.replace("w.pth", str(tmp_path / "w.pth")).replace(
                        "=full", f"={tmp_path / 'full'}"
                    )
                    for a in args
                ]
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("vggjax.convert: error: ") and message in err
        assert len(err.strip().splitlines()) == 1, err


def test_verify_says_when_the_reference_library_is_missing(tmp_path, monkeypatch, capsys):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    for name in ("timm", "torch"):  # importing them now raises ImportError, installed or not
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as e:
        convert.main(
            [
                "--from=timm",
                str(tmp_path / "w.pth"),
                "--model=D",
                "--verify",
                f"--output={tmp_path / 'out'}",
            ]
        )
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "--verify for timm weights needs" in err and "which is not installed" in err


def _verify_torchvision(tmp_path) -> list[str]:
    return [
        "--from=torchvision",
        str(tmp_path / "w.pth"),
        "--model=D",
        "--verify",
        f"--output={tmp_path / 'out'}",
    ]


def test_verify_fails_when_the_outputs_differ(tmp_path, monkeypatch, capsys):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    monkeypatch.setattr(
        convert,
        "reference",
        lambda source, path: (
            lambda model, top, rgb: np.ones((len(rgb), model.num_classes), np.float32)
        ),
    )
    with pytest.raises(SystemExit) as e:
        convert.main(_verify_torchvision(tmp_path))
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "Compared with torchvision: max relative difference" in out
    assert err.startswith("vggjax.convert: error: the converted net differs from torchvision's by")


def test_verify_names_a_reference_failure_in_one_line(tmp_path, monkeypatch, capsys):
    """The library's own (many-line) message stays out: one line naming the error and the file."""
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))

    def load_state_dict(state):
        raise RuntimeError("Error(s) in loading state_dict for VGG:\n\tMissing key(s): ...")

    net = types.SimpleNamespace(load_state_dict=load_state_dict)
    stub = types.SimpleNamespace(models=types.SimpleNamespace(vgg16=lambda num_classes: net))
    monkeypatch.setitem(sys.modules, "torchvision", stub)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=lambda p, **_: {}))
    with pytest.raises(SystemExit) as e:
        convert.main(_verify_torchvision(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"torchvision raised RuntimeError on {tmp_path / 'w.pth'}" in err


def test_cli_lets_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Only UserError becomes a one-line exit; anything else is a bug and propagates."""
    monkeypatch.setattr(convert, "convert", lambda *_: {}["pretrained"])
    with pytest.raises(KeyError):
        convert.main(["--from=torchvision", "w.pth", "--model=D", f"--output={tmp_path}"])
