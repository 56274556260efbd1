"""vggjax.export: the StableHLO artifact and the ONNX file, served in a process without vggjax,
equal the net they came from."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, init, narrow

from vggjax import checkpoints, export, storage
from vggjax.data import augment
from vggjax.errors import UserError

MEAN_RGB = (123.5, 116.0, 104.0)
CLASSES = [f"class {i}" for i in range(10)]

# Serving as a user would, without vggjax: argv[1] the artifacts' folder, argv[2] the inputs
# (.npz, one array per case), argv[3] where to write each case's probabilities from both files.
SERVE = """
import sys
import jax, numpy as np, onnxruntime
folder, inputs, outputs = sys.argv[1:]
with open(f"{folder}/model.stablehlo", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
results = {}
for case, images in np.load(inputs).items():
    results["stablehlo_" + case] = np.asarray(exported.call(images))
    results["onnx_" + case] = session.run(None, {"images": images})[0]
assert not any(m.startswith("vggjax") for m in sys.modules), "imported vggjax"
np.savez(outputs, **results)
"""


def _checkpoint(path, name):
    """A narrow net's checkpoint with random weights (BN statistics too), mean and class names."""
    model = narrow(name, winograd="off")
    variables = init(model)
    leaves, tree = jax.tree.flatten(variables)
    rng = np.random.default_rng(0)
    # Every weight off its init (biases and BN statistics too), BN variances still positive.
    leaves = [
        x * rng.uniform(0.5, 1.5, x.shape) + rng.uniform(-0.05, 0.05, x.shape) for x in leaves
    ]
    variables = jax.tree.unflatten(tree, [x.astype(np.float32) for x in leaves])
    # fc8 scaled so that the probabilities are not one-hot: logits of standard deviation 2.
    crops = augment.subtract_mean(_images(rng, 4, model.crop_size, model.crop_size), MEAN_RGB)
    scale = 2 / np.std(model.apply(variables, crops))
    variables["params"]["fc8"] = jax.tree.map(lambda x: x * scale, variables["params"]["fc8"])
    checkpoints.save_params(str(path), variables)
    config = {f: getattr(model.spec, f) for f in ("model", "num_classes", "width", "fc_width")}
    config.update(crop_size=model.crop_size, mean_rgb=list(MEAN_RGB), classes=CLASSES)
    storage.write_json(path / checkpoints.CONFIG_FILE, config)
    return model, variables


def _reference(model, variables, images, dense):
    """`model.apply` on the preprocessed images, softmaxed (dense: the map's average)."""
    x = augment.subtract_mean(images, MEAN_RGB)
    scores = jax.jit(lambda x: model.apply(variables, x, dense=dense))(x)
    return np.asarray(jax.nn.softmax(scores.mean((1, 2)) if dense else scores))


def _serve(folder, cases):
    """Each case's probabilities from both files, in a fresh process that does not import vggjax."""
    np.savez(folder / "inputs.npz", **cases)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            str(folder / "out"),
            str(folder / "inputs.npz"),
            str(folder / "results.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(folder / "results.npz"))


def _check(folder, model, variables, cases, dense):
    served = _serve(folder, cases)
    for case, images in cases.items():
        want = _reference(model, variables, images, dense)
        np.testing.assert_allclose(served["stablehlo_" + case], want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(served["onnx_" + case], want, rtol=0, atol=1e-5)
        assert want.max() < 0.99  # probabilities, not one-hot


def _images(rng, *shape):
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_command_line_classic_form_with_lrn(tmp_path):
    model, variables = _checkpoint(tmp_path / "ckpt", "A-LRN")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vggjax.export",
            f"--weights={tmp_path / 'ckpt'}",
            f"--output={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    terms = json.loads((tmp_path / "out" / export.FILES["contract"]).read_text())
    assert terms["classes"] == CLASSES and terms["form"] == "classic"
    assert terms["input"]["dtype"] == "uint8" and terms["input"]["height"] == 64
    rng = np.random.default_rng(1)
    cases = {"batch1": _images(rng, 1, 64, 64), "batch3": _images(rng, 3, 64, 64)}
    _check(tmp_path, model, variables, cases, dense=False)


def test_dense_form_with_batch_norm_any_size(tmp_path):
    model, variables = _checkpoint(tmp_path / "ckpt", "vgg11_bn")
    written = export.export(str(tmp_path / "ckpt"), str(tmp_path / "out"), dense=True)
    assert set(written) == {"stablehlo", "onnx", "contract"}
    terms = json.loads((tmp_path / "out" / export.FILES["contract"]).read_text())
    assert terms["form"] == "dense" and terms["input"]["width"] == {"min": 64}
    rng = np.random.default_rng(2)
    cases = {"small": _images(rng, 2, 64, 64), "large": _images(rng, 3, 96, 128)}
    _check(tmp_path, model, variables, cases, dense=True)


def test_without_onnx_and_refusals(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(UserError, match="not an empty directory"):
        export.export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="platforms must be some of"):
        export.export(str(tmp_path / "ckpt"), str(tmp_path / "new"), platforms=["gpu"])
    _checkpoint(tmp_path / "ckpt", "A")
    written = export.export(str(tmp_path / "ckpt"), str(tmp_path / "hlo"), onnx=False)
    assert set(written) == {"stablehlo", "contract"}
    terms = json.loads((tmp_path / "hlo" / export.FILES["contract"]).read_text())
    assert terms["files"] == {"stablehlo": "model.stablehlo"}
    config = checkpoints.read_config(str(tmp_path / "ckpt"))
    storage.write_json(
        tmp_path / "ckpt" / checkpoints.CONFIG_FILE,
        {**config, "pretrained": {"include_top": False}},
    )
    with pytest.raises(UserError, match="no top"):
        export.export(str(tmp_path / "ckpt"), str(tmp_path / "new"))
