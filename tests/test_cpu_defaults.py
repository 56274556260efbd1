"""vggjax's CPU defaults: the XLA flag set at import (the user's own wins), the Winograd
convolutions, and the float32 gradients of the default against float64."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT

from vggjax import backend, models, winograd

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import grad_accuracy  # benchmarks/grad_accuracy.py: the float64 reference

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_import_sets_the_flag_and_xla_uses_it():
    out = _convolution_in_subprocess("--xla_force_host_platform_device_count=2")
    assert out["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}=individual_dot"
    assert out["devices"] == "2"  # the user's other flags still reach XLA
    assert out["ynn"] == "False"  # the convolution runs in XLA's kernels, not YNNPACK


def test_a_users_own_flag_wins():
    out = _convolution_in_subprocess(f"{FLAG}=+individual_dot")  # JAX's own default list
    assert out["XLA_FLAGS"] == f"{FLAG}=+individual_dot"
    assert out["ynn"] == "True"  # JAX's default: the convolution goes to YNNPACK


def test_with_cpu_flags_appends_only_what_is_missing():
    assert backend.with_cpu_flags("") == f"{FLAG}=individual_dot"
    assert backend.with_cpu_flags(" --a=1 ") == f"--a=1 {FLAG}=individual_dot"
    assert backend.with_cpu_flags(f"--a=1 {FLAG}=dot") == f"--a=1 {FLAG}=dot"


@pytest.mark.parametrize("shape", [(2, 28, 28, 128), (1, 29, 35, 128)])
def test_winograd_matches_the_direct_convolution(shape):
    """Values and both gradients, on even and odd maps (the last tiles padded), to float32
    rounding: 1e-5 of the norm, where the measured difference is 1-3e-6."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(0, 0.05, (3, 3, shape[-1], 16)).astype(np.float32)
    dy = rng.normal(size=shape[:3] + (16,)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(jax.jit(winograd.conv3x3), x, kernel)
    ref, ref_vjp = jax.vjp(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn),
        x,
        kernel,
    )
    for got, want in zip((y, *vjp(dy)), (ref, *ref_vjp(dy))):
        assert grad_accuracy.relative(got, want) < 1e-5


@pytest.mark.parametrize("backend, winograd_used", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_winograd_only_where_the_default_backend_is_the_cpu(monkeypatch, backend, winograd_used):
    """Decided when tracing, so a GPU's program holds XLA's convolution and nothing of F(4×4,
    3×3): no branch, no zero residuals of the other path."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x, kernel = jnp.zeros((1, 28, 28, 128)), jnp.zeros((3, 3, 128, 16))
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    conv = lambda x, k: winograd.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)
    text = jax.jit(jax.grad(lambda x, k: conv(x, k).sum(), (0, 1))).lower(x, kernel).as_text()
    assert ("dot_general" in text) == winograd_used
    assert ("convolution" in text) != winograd_used
    assert "case" not in text


def test_the_default_picks_winograd_where_it_was_faster(monkeypatch):
    model = models.create_model("D")
    variables, inputs, worth_it = models.abstract_variables(model), [], winograd.worth_it

    def recording(x_shape, *args):
        inputs.extend([x_shape] if worth_it(x_shape, *args) else [])
        return worth_it(x_shape, *args)

    monkeypatch.setattr(winograd, "worth_it", recording)
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 224, 224, 3)))
    # >= 128 channels in, maps >= 28 px: conv2_2, conv3_1-3 and conv4_1-3, not conv5_x at 14.
    assert (
        inputs
        == [(1, 112, 112, 128), (1, 56, 56, 128)]
        + [(1, 56, 56, 256)] * 2
        + [(1, 28, 28, 256)]
        + [(1, 28, 28, 512)] * 2
    )


def test_default_float32_gradients_match_float64():
    """VGG net B, width 1 at 64×64 (conv2_2 by Winograd), glorot init, 2 images: every
    layer's float32 kernel gradient against float64's, with float64 held to float32's ReLU
    and max-pooling decisions (benchmarks/grad_accuracy.py; where float32 and float64 decide
    differently the gradient moves to another pixel, max-pooling's kink, not arithmetic).
    Measured here: at most 2e-6 of each layer's gradient norm, what float32 rounding over
    reductions of 1e3-1e5 terms gives; the bound, 1e-5, fails for matrix products rounded to
    TF32 or bfloat16 (1e-3 and worse) or a transform off by one term."""
    model = models.create_model("B", 10, fc_width=64, crop_size=64, kernel_init="glorot")
    params = models.init_variables(model, jax.random.key(0))["params"]
    images = np.random.default_rng(0).normal(0, 50, (2, 64, 64, 3)).astype(np.float32)
    labels = np.array([3, 7])
    loss = lambda p: grad_accuracy.cross_entropy(model.apply({"params": p}, images), labels)
    grads = jax.jit(jax.grad(loss))(params)
    masks = grad_accuracy.decisions(model, params, images)
    ref = grad_accuracy.float64_gradients(model, params, images, labels, masks)
    errors = {n: grad_accuracy.relative(grads[n]["kernel"], ref[n]["kernel"]) for n in grads}
    assert max(errors.values()) < 1e-5, errors


# Helpers


def _convolution_in_subprocess(xla_flags: str) -> dict[str, str]:
    """Imports vggjax under `xla_flags`, compiles a convolution; XLA_FLAGS, device count and
    whether the compiled program hands the convolution to YNNPACK."""
    code = (
        "import os, jax, jax.numpy as jnp, vggjax\n"
        "x, k = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))\n"
        "conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',"
        " dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
        "text = jax.jit(conv).lower(x, k).compile().as_text()\n"
        "print(os.environ['XLA_FLAGS']); print(jax.device_count()); print('__ynn_fusion' in text)\n"
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(zip(("XLA_FLAGS", "devices", "ynn"), result.stdout.strip().split("\n")))
