"""perceptual.lpips against the lpips package's own `LPIPS(net="vgg")` on the same backbone.

lpips imports torchvision for its backbone (`torchvision.models.vgg16(pretrained=...).features`,
the only name its VGG path touches), and torchvision does not install beside the local CPU torch:
the test puts a stand-in `torchvision` into sys.modules whose `models.vgg16` returns a torch.nn
replica of torchvision's VGG16 (convert_files.torch_vgg) with random weights — as lpips's own
`pnet_rand=True` would, downloading nothing. The same net, converted as a torchvision checkpoint,
is vggjax's loss network; lpips's linear layers are its official ones, read by each side from the
installed package's file. Full-width VGG16 (the linear weights need its channels) on small images.
"""

import importlib
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_files import CFG, NARROW, relative_difference, torch_vgg

from vggjax import convert, perceptual
from vggjax.errors import UserError

SHAPE = (2, 48, 64, 3)  # not square, and not a multiple of 32: conv5_3 is 3×4


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(vggjax's LossNet, lpips's LPIPS in float64, lpips's LPIPS with spatial=True) over one
    random VGG16."""
    torch.manual_seed(0)
    net = torch_vgg(CFG["D"], divisor=1, fc=16, classes=10, window=2)
    path = tmp_path_factory.mktemp("lpips")
    torch.save(net.state_dict(), path / "w.pth")
    convert.convert("torchvision", str(path / "w.pth"), "D", str(path / "ckpt"))
    tv_models = types.ModuleType("torchvision.models")
    tv_models.vgg16 = lambda pretrained=False, weights=None: net
    tv = types.ModuleType("torchvision")
    tv.models = tv_models
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchvision", tv)
        mp.setitem(sys.modules, "torchvision.models", tv_models)
        for name in [n for n in sys.modules if n.split(".")[0] == "lpips"]:
            mp.delitem(sys.modules, name)  # imported anew over the stand-in, restored after
        lpips = importlib.import_module("lpips")
        refs = [
            lpips.LPIPS(net="vgg", pnet_rand=True, spatial=s, verbose=False).double()
            for s in (False, True)
        ]
        for name in [n for n in sys.modules if n.split(".")[0] == "lpips"]:
            del sys.modules[name]
    assert all(r.net.slice1[0] is net.features[0] for r in refs)  # the stand-in's net
    return perceptual.load(str(path / "ckpt")), *refs


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, SHAPE).astype(np.float32)


def _torch(rgb: np.ndarray) -> torch.Tensor:
    """[0, 1] NHWC → lpips's input, [-1, 1] NCHW, in float64, with its gradient kept."""
    return torch.tensor(2 * rgb.transpose(0, 3, 1, 2).astype(np.float64) - 1, requires_grad=True)


def test_distance_and_gradient_equal_lpips(nets):
    """Against lpips in float64, so the difference is vggjax's float32 rounding alone."""
    loss_net, ref, _ = nets
    x, y = _rgb(1), _rgb(2)

    def total(net, a, b):
        d = perceptual.lpips(net, a, b)
        return jnp.sum(d * jnp.arange(1.0, 1.0 + len(d))), d  # the images' gradients differ

    (_, d), grad = jax.jit(jax.value_and_grad(total, argnums=1, has_aux=True))(loss_net, x, y)
    tx = _torch(x)
    want = ref(tx, _torch(y)).reshape(-1)
    (want * torch.arange(1.0, 1.0 + len(want), dtype=torch.float64)).sum().backward()
    want_grad = 2 * tx.grad.numpy().transpose(0, 2, 3, 1)  # d/d[0, 1] = 2 d/d[-1, 1]
    assert d.shape == (SHAPE[0],) and relative_difference(d, want.detach().numpy()) < 1e-5
    assert relative_difference(grad, want_grad) < 1e-5 and np.max(np.abs(want_grad)) > 0


def test_spatial_map_equals_lpips(nets):
    loss_net, _, ref = nets
    x, y = _rgb(3), _rgb(4)
    got = jax.jit(lambda n, a, b: perceptual.lpips(n, a, b, spatial=True))(loss_net, x, y)
    with torch.no_grad():
        want = ref(_torch(x), _torch(y)).numpy()[:, 0]
    assert got.shape == SHAPE[:3] and relative_difference(got, want) < 1e-5


def test_identity_and_symmetry(nets):
    """d(x, x) = 0 exactly eagerly; jitted, XLA may round the two normalisations differently
    (3e-16 here, against distances of 2e-2)."""
    lpips, loss_net = jax.jit(perceptual.lpips), nets[0]
    x, y = _rgb(5), _rgb(6)
    assert np.all(perceptual.lpips(loss_net, x[:1, :32, :32], x[:1, :32, :32]) == 0)
    assert np.max(lpips(loss_net, x, x)) < 1e-12
    xy, yx = lpips(loss_net, x, y), lpips(loss_net, y, x)
    assert np.all(xy > 1e-3) and relative_difference(xy, yx) < 1e-6


def test_official_weights_are_checked(tmp_path, monkeypatch):
    weights = perceptual.lpips_weights()
    assert [w.size for w in weights.values()] == [64, 128, 256, 512, 512]
    assert all(np.min(w) >= 0 for w in weights.values())  # lpips clamps them when training
    damaged = tmp_path / "vgg.pth"
    data = bytearray(pathlib.Path(perceptual._lpips_file()).read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(data)
    with monkeypatch.context() as mp:
        mp.setattr(perceptual, "_lpips_file", lambda: str(damaged))
        with pytest.raises(UserError, match=f"{damaged}: SHA-256 .*reinstall lpips"):
            perceptual.lpips_weights.__wrapped__()  # uncached
    monkeypatch.setattr(perceptual.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps lpips==0\.1\.4"):
        perceptual._lpips_file()


def test_nets_and_shapes_it_refuses(tmp_path):
    for name in ("D", "E"):  # VGG16 at 1/16 width, VGG19
        net = torch_vgg(CFG[name], **NARROW)
        torch.save(net.state_dict(), tmp_path / f"{name}.pth")
        convert.convert("torchvision", str(tmp_path / f"{name}.pth"), name, str(tmp_path / name))
    narrow, vgg19 = (perceptual.load(str(tmp_path / name)) for name in ("D", "E"))
    x = _rgb(7)
    with pytest.raises(UserError, match="conv1_2's channels must be VGG16's, got 4"):
        perceptual.lpips(narrow, x, x)
    with pytest.raises(UserError, match="LPIPS's net must be a VGG16 \\(D\\), got 'E'"):
        perceptual.lpips(vgg19, x, x)
    with pytest.raises(UserError, match="targets' shape must be images' \\(2, 48, 64, 3\\)"):
        perceptual.lpips(narrow, x, x[:1])
