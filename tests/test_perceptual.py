"""vggjax.perceptual: VGG as a loss network, against torch on the same converted weights.

The reference is torchvision's `features` Sequential — conv, (batch norm,) ReLU, ..., max-pool,
indexed as torchvision indexes it — built with torch.nn (convert_files.torch_vgg), since
torchvision does not install beside the local CPU torch; and torchvision's own `make_layers`
when it is importable. `features[:k]` of RGB normalised by torchvision's mean and std must equal
the named activation of the same RGB in [0, 1] to 1e-5, and the losses' gradients with respect
to the images must equal torch autograd's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_files import CFG, NARROW, TORCH_MEAN, TORCH_STD, relative_difference, torch_vgg

from vggjax import convert, models, perceptual
from vggjax.errors import UserError


@pytest.mark.parametrize("batch_norm", [False, True])
def test_named_activations_equal_torchvision_features(tmp_path, batch_norm):
    net = torch_vgg(CFG["D"], **NARROW, batch_norm=batch_norm)
    loss_net = _loss_net(tmp_path, net, "vgg16_bn" if batch_norm else "D")
    assert not set(loss_net.variables["params"]) & set(models.FC_LAYERS)  # the top is dropped
    _assert_features_match(loss_net, net.features, CFG["D"], batch_norm)


def test_average_pooling_equals_torch_with_avgpool(tmp_path):
    net = torch_vgg(CFG["E"], **NARROW)
    features = torch.nn.Sequential(
        *[
            torch.nn.AvgPool2d(2, 2) if isinstance(m, torch.nn.MaxPool2d) else m
            for m in net.features
        ]
    )
    loss_net = _loss_net(tmp_path, net, "E", pool_layers="average")
    _assert_features_match(
        loss_net, features, CFG["E"], False, ["conv2_1", "conv3_4:pre", "pool4", "conv5_4"]
    )
    max_net = perceptual.load(str(tmp_path / "ckpt"))  # the same weights, max-pooling
    a, b = (n.activations(_rgb(), ("conv2_1",))["conv2_1"] for n in (loss_net, max_net))
    assert relative_difference(a, b) > 1e-2


def _torch_gram(f):
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def test_losses_and_their_gradients_equal_torch_autograd(tmp_path):
    """Against torch in float64, so the difference is vggjax's float32 rounding alone (torch's
    own float32 autograd differs from float64 by 1e-4 here); a dark style image keeps the Gram
    differences from being small differences of large numbers."""
    net = torch_vgg(CFG["D"], **NARROW)
    loss_net = _loss_net(tmp_path, net, "D")
    net = net.double()
    indices = torchvision_indices(CFG["D"])
    rgb, target, style = _rgb(1), _rgb(2), _rgb(3, (1, 80, 64, 3)) ** 4
    content_layers, weights = ("conv2_2", "conv3_3:pre"), (1.0, 0.5)

    def loss(net_, x):
        content = perceptual.content_loss(net_, x, target, content_layers, weights)
        return content + 10.0 * perceptual.style_loss(net_, x, style)

    value, grad = jax.jit(jax.value_and_grad(loss, argnums=1))(loss_net, jnp.asarray(rgb))

    x, tx = _torch_input(rgb, requires_grad=True, dtype=np.float64)
    _, tt = _torch_input(target, dtype=np.float64)
    _, ts = _torch_input(style, dtype=np.float64)
    want = sum(
        w * torch.mean((net.features[: indices[n]](tx) - net.features[: indices[n]](tt)) ** 2)
        for n, w in zip(content_layers, weights)
    )
    for n in perceptual.STYLE_LAYERS:
        fx, fs = (net.features[: indices[n]](t) for t in (tx, ts))
        want = want + 10.0 * torch.mean((_torch_gram(fx) - _torch_gram(fs)) ** 2)
    want.backward()
    want = float(want.detach())
    assert abs(float(value) - want) <= 1e-5 * abs(want)
    assert relative_difference(grad, _nhwc(x.grad)) < 1e-5
    assert float(jnp.max(jnp.abs(grad))) > 0


def test_loss_net_is_a_pytree_argument_of_jit(tmp_path):
    loss_net = _loss_net(tmp_path, torch_vgg(CFG["D"], **NARROW), "D")
    traces = []

    @jax.jit
    def features(net, x):
        traces.append(1)
        return net.activations(x, ("conv1_2", "conv1_2:pre"))

    out = features(loss_net, _rgb())
    again = features(perceptual.load(str(tmp_path / "ckpt")), _rgb(5))  # another load, same net
    assert len(traces) == 1 and set(out) == set(again) == {"conv1_2", "conv1_2:pre"}
    assert jnp.array_equal(out["conv1_2"], jax.nn.relu(out["conv1_2:pre"]))
    assert float(jnp.min(out["conv1_2:pre"])) < 0


def test_torchvision_itself_when_installed(tmp_path):
    try:
        import torchvision
    except (ImportError, RuntimeError) as e:  # RuntimeError: a build for another torch (lpips
        pytest.skip(f"torchvision does not import: {e}")  # pulls PyPI's beside the CPU torch)
    cfg = [v if v == "M" else v // 16 for v in CFG["D"]]
    features = torchvision.models.vgg.make_layers(cfg).eval()
    for m in features.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    convert.convert("torchvision", str(tmp_path / "w.pth"), "D", str(tmp_path / "ckpt"))
    loss_net = perceptual.load(str(tmp_path / "ckpt"))
    _assert_features_match(loss_net, features, CFG["D"], False)


def test_bad_layer_names_and_poolings(tmp_path):
    loss_net = _loss_net(tmp_path, torch_vgg(CFG["D"], **NARROW), "D")
    for layers in (("conv1_1", "pool1:pre"), ("conv6_1",), ()):
        with pytest.raises(ValueError, match="output must name layers of the net"):
            loss_net.activations(_rgb(), layers)
    with pytest.raises(
        UserError, match=r"pool_layers must be one of \('max', 'average'\), got 'min'"
    ):
        perceptual.load(str(tmp_path / "ckpt"), pool_layers="min")
    with pytest.raises(UserError, match="weights must be 2 numbers"):
        perceptual.content_loss(loss_net, _rgb(), _rgb(1), ("conv1_1", "conv2_1"), (1.0,))


# Helpers ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seeded_torch():
    """torch_vgg's random init, the same in every test: an unlucky draw (conv1_1's 4 narrow
    channels all dead) once made avg- and max-pooled maps agree to 1e-3 in the suite."""
    torch.manual_seed(0)


def torchvision_indices(cfg: list, batch_norm: bool = False) -> dict[str, int]:
    """Layer name → k such that torchvision's `features[:k]` ends with that layer: a conv's
    ReLU (`conv3_3`), the layer before it (`conv3_3:pre`: the conv, or its batch norm), a pool."""
    indices, k, stage, conv = {}, 0, 1, 0
    for v in cfg:
        if v == "M":
            k += 1
            indices[f"pool{stage}"] = k
            stage, conv = stage + 1, 0
            continue
        conv += 1
        k += 2 if batch_norm else 1
        indices[f"conv{stage}_{conv}:pre"] = k
        k += 1
        indices[f"conv{stage}_{conv}"] = k
    return indices


def _torch_input(rgb: np.ndarray, requires_grad: bool = False, dtype=np.float32):
    """RGB in [0, 1] NHWC → torchvision's input (normalised NCHW), with the graph from `rgb`."""
    x = torch.tensor(rgb.transpose(0, 3, 1, 2).astype(dtype), requires_grad=requires_grad)
    mean, std = (torch.tensor(a.astype(dtype)).reshape(1, 3, 1, 1) for a in (TORCH_MEAN, TORCH_STD))
    return x, (x - mean) / std


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _loss_net(tmp_path, net, name: str, pool_layers: str = "max") -> perceptual.LossNet:
    torch.save(net.state_dict(), tmp_path / "w.pth")
    convert.convert("torchvision", str(tmp_path / "w.pth"), name, str(tmp_path / "ckpt"))
    return perceptual.load(str(tmp_path / "ckpt"), pool_layers=pool_layers)


def _rgb(seed: int = 0, shape=(2, 64, 96, 3)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def _assert_features_match(loss_net, features, cfg, batch_norm, names=None) -> None:
    rgb = _rgb()
    indices = torchvision_indices(cfg, batch_norm)
    names = list(indices) if names is None else names
    ours = loss_net.activations(rgb, names)
    _, x = _torch_input(rgb)
    with torch.no_grad():
        for name in names:
            want = _nhwc(features[: indices[name]](x.clone()))
            assert ours[name].shape == want.shape, name
            assert relative_difference(ours[name], want) < 1e-5, name
