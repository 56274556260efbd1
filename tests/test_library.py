"""vggjax as a library: importing it changes nothing in the user's process, every JAX
transformation works through every net with Winograd's convolutions or without, and the command
line computes the same however it is started."""

import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, narrow

import vggjax
from vggjax import models, pretrained

# A user's package: its __init__ imports every vggjax module; `python -m userpkg.train` must
# run the package's own code once and see its environment, XLA flags and JAX listeners as they
# were. (`python -m` imports the parent package first, with sys.argv[0] == "-m".)
_USER_INIT = """
import os, pkgutil, sys, importlib
import jax._src.monitoring as monitoring
print("init", os.getpid(), sys.argv[0], flush=True)
listeners = lambda: [len(v) for v in vars(monitoring).values() if isinstance(v, list)]
BEFORE = dict(os.environ), list(sys.argv), listeners()
import vggjax
for m in pkgutil.walk_packages(vggjax.__path__, "vggjax."):
    if not m.name.endswith("__main__") and m.name != "vggjax.main":
        importlib.import_module(m.name)
import vggjax.main  # the command line's module too: importing it runs nothing
AFTER = dict(os.environ), list(sys.argv), listeners()
"""
_USER_TRAIN = """
import userpkg
print("same environment", userpkg.BEFORE[0] == userpkg.AFTER[0])
print("same argv", userpkg.BEFORE[1] == userpkg.AFTER[1])
print("same listeners", userpkg.BEFORE[2] == userpkg.AFTER[2])
"""


def _stdout(command: list[str], cwd: Any, env: dict[str, str]) -> str:
    """`command`'s stdout; it must succeed. Without GLIBC_TUNABLES, so that a restart with huge
    pages happens where one would."""
    env = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_vggjax_changes_nothing_in_a_users_program(tmp_path):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text(_USER_INIT)
    (package / "train.py").write_text(_USER_TRAIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    lines = _stdout([sys.executable, "-m", "userpkg.train"], tmp_path, env).splitlines()
    assert len([line for line in lines if line.startswith("init")]) == 1, lines
    assert lines[1:] == ["same environment True", "same argv True", "same listeners True"]


def test_the_console_script_and_python_m_compute_the_same_bits(tmp_path, tiny_demo_dir):
    """Both go through the same entry point (backend.tune_cpu(restart=True)): one training step
    gives bit-identical parameters, and both record the same Winograd setting. At a 128 crop,
    conv4 (64 channels, 16 px) is Winograd's with huge pages and XLA's without: a launch that
    missed the restart would differ there."""
    script = pathlib.Path(sys.executable).parent / "vggjax"
    if not script.exists():
        pytest.skip("the vggjax console script is not installed (pip install -e .)")
    args = [
        "--config=configs/demo.py",
        f"--config.data_dir={tiny_demo_dir}",
        "--config.width=0.125",
        "--config.fc_width=32",
        "--config.crop_size=128",
        "--config.train_scale=(128,136)",
        "--config.eval_scale=128",
        "--config.eval.scales=(128,)",
        "--config.loc.scales=(128,)",
        "--config.batch_size=8",
        "--config.num_workers=0",
        "--config.num_train_steps=1",
        "--config.eval_every_steps=1000",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    runs = {}
    for name, command in (("m", [sys.executable, "-m", "vggjax.main"]), ("script", [str(script)])):
        runs[name] = str(tmp_path / name)
        _stdout([*command, *args, f"--workdir={runs[name]}"], ROOT, env)
    configs = [pretrained.read_config(workdir) for workdir in runs.values()]
    assert configs[0]["winograd"] == configs[1]["winograd"] != "auto"
    (_, a), (_, b) = (pretrained.load_pretrained(workdir)[:2] for workdir in runs.values())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


_NETS = ["A", "A-LRN", "B", "C", "D", "E", "B-shallow", "vgg11_bn"]


def _transforms(model: models.VGG, variables: dict, x: jax.Array) -> dict[str, tuple]:
    """Every JAX transformation of the net, each paired with what it must equal: forward mode
    (jvp, linearize, jacfwd) against reverse mode (grad, vjp), hessian (forward over reverse)
    against reverse over forward, vmap against the batch."""
    return {name: (first(), second()) for name, (first, second) in _pairs(model, variables, x)}


def _firsts(model: models.VGG, variables: dict, x: jax.Array) -> dict[str, tuple]:
    """`_transforms` without the second of each pair: half the program."""
    return {name: (first(),) for name, (first, _) in _pairs(model, variables, x)}


def _pairs(model: models.VGG, variables: dict, x: jax.Array) -> list:
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.normal(0, 20, (2, *x.shape)), jnp.float32)  # two input directions
    w = jnp.asarray(rng.normal(size=(x.shape[0], model.num_classes)), jnp.float32)
    params = variables["params"]
    logits = lambda p, images: model.apply({**variables, "params": p}, images)

    # A scalar of the logits along the plane x + α·v; the logits scaled to about 1 first, where
    # tanh is curved but not flat (its second derivative's relative error grows with |z|).
    scale = jax.lax.stop_gradient(1 / (1 + jnp.abs(logits(params, x)).max()))

    def along(alpha):
        return (jnp.tanh(scale * logits(params, x + jnp.tensordot(alpha, v, 1))) * w).sum()

    on_images = lambda images: logits(params, images)
    on_params = lambda p: (logits(p, x) * w).sum()
    dp = jax.tree.map(lambda p: p / (1 + jnp.abs(p).max()), params)  # a direction in params
    grad = lambda: jax.grad(on_params)(params)
    dot = lambda a, b: sum((p * q).sum() for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    zero = jnp.zeros(2)
    return [
        (
            "jvp",
            (
                lambda: dot(jax.jvp(on_images, (x,), (v[0],))[1], w),
                lambda: dot(jax.vjp(on_images, x)[1](w)[0], v[0]),
            ),
        ),
        ("linearize", (lambda: jax.linearize(on_params, params)[1](dp), lambda: dot(grad(), dp))),
        ("jacfwd", (lambda: jax.jacfwd(along)(zero), lambda: jax.jacrev(along)(zero))),
        (
            "hessian",
            (lambda: jax.hessian(along)(zero), lambda: jax.jacrev(jax.jacfwd(along))(zero)),
        ),
        (
            "vmap",
            (lambda: jax.vmap(lambda image: on_images(image[None])[0])(x), lambda: on_images(x)),
        ),
        ("grad", (grad, grad)),
    ]


def _close(got: Any, want: Any, tolerance: float = 1e-4) -> bool:
    """Every leaf of `got` within `tolerance` of `want`'s norm."""
    return all(
        float(jnp.linalg.norm(g - w)) <= tolerance * (float(jnp.linalg.norm(w)) or 1.0)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )


def _run(name: str, winograd: str, transforms: Callable = _transforms) -> tuple[dict, str]:
    model = narrow(name, crop=32, winograd=winograd)
    variables = models.init_variables(model, jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (2, 32, 32, 3)), jnp.float32)
    program = jax.jit(transforms, static_argnums=0).lower(model, variables, x)
    return program.compile()(variables, x), program.as_text()


@pytest.mark.parametrize("name", _NETS)
def test_every_transformation_through_every_net(name):
    """Forward mode agrees with reverse mode, hessian's forward-over-reverse with
    reverse-over-forward, vmap with the batch, through every layer kind of Table 1 (LRN, 5×5
    and 1×1 convs, batch norm, pooling, FC): each pair computed in float32, to rounding."""
    results, _ = _run(name, "off")
    for transform, (got, want) in results.items():
        assert _close(got, want), (transform, got, want)


def test_every_transformation_with_winograd_equals_xla():
    """Net A with F(4×4, 3×3) in all eight 3×3 layers ("all": no XLA convolution left): each
    transformation equals XLA's convolution's ("off", whose pairs agree: above), to float32
    rounding (the transforms add about 2e-6 of each layer's output). One net keeps the suite's
    time (Winograd's programs compile slowly): the custom JVP is per layer, and the net is eight
    of them; every net's layer kinds run above."""
    (winograd, text), (xla, _) = _run("A", "all", _firsts), _run("A", "off", _firsts)
    assert "convolution" not in text and "dot_general" in text
    for transform in xla:
        assert _close(winograd[transform], xla[transform]), transform


def test_config_records_the_winograd_setting_the_run_used(tiny_config, tmp_path):
    from vggjax import train

    tiny_config.num_train_steps = 1
    tiny_config.winograd = "all"
    train.train_and_evaluate(tiny_config, str(tmp_path))
    assert pretrained.read_config(str(tmp_path))["winograd"] == "all"


def test_the_public_names_load_on_first_use():
    assert {"create_model", "load_pretrained", "tune_cpu"} <= set(dir(vggjax))
    assert vggjax.create_model is models.create_model
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vggjax.nothing  # noqa: B018
