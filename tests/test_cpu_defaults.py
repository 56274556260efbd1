"""vggjax's CPU defaults (`vggjax.tune_cpu`): the XLA flag (the user's own wins), huge pages, the
Winograd convolutions, and the float32 gradients of the default against float64."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT

from vggjax import backend, convolution, models, sharding, train, winograd

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import grad_accuracy  # benchmarks/grad_accuracy.py: the float64 reference

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_tune_cpu_sets_the_flag_and_xla_uses_it():
    out = _convolution_in_subprocess("--xla_force_host_platform_device_count=2")
    assert out["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}="
    assert out["devices"] == "2"  # the user's other flags still reach XLA
    assert out["ynn"] == "False"  # the convolution and the product run outside YNNPACK
    assert out["tuned"] == "True"


def test_a_users_own_flag_wins():
    out = _convolution_in_subprocess(f"{FLAG}=+individual_dot")  # JAX's own default list
    assert out["XLA_FLAGS"] == f"{FLAG}=+individual_dot"
    assert out["ynn"] == "True"  # JAX's default: the convolution goes to YNNPACK


def test_one_variable_turns_the_tuning_off():
    """VGGJAX_CPU_TUNING=0: tune_cpu sets no flag, Winograd stays off, JAX's defaults run."""
    out = _convolution_in_subprocess("--xla_force_host_platform_device_count=2", off=True)
    assert out["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert out["ynn"] == "True"
    assert out["tuned"] == "False" and out["winograd"] == "off"


def test_with_cpu_flags_appends_only_what_is_missing():
    assert backend.with_cpu_flags("") == f"{FLAG}="
    assert backend.with_cpu_flags(" --a=1 ") == f"--a=1 {FLAG}="
    assert backend.with_cpu_flags(f"--a=1 {FLAG}=dot") == f"--a=1 {FLAG}=dot"


@pytest.mark.parametrize("shape", [(2, 28, 28, 128), (1, 29, 35, 128)])
def test_winograd_matches_the_direct_convolution(shape):
    """Values and both gradients, on even and odd maps (the last tiles padded), to float32
    rounding: 1e-5 of the norm, where the measured difference is 1-3e-6."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(0, 0.05, (3, 3, shape[-1], 16)).astype(np.float32)
    dy = rng.normal(size=shape[:3] + (16,)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, winograd.NHWC)
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
    grad = jax.jit(jax.grad(lambda x, k: _layer_conv(x, k, "small_pages").sum(), (0, 1)))
    text = grad.lower(x, kernel).as_text()
    assert ("dot_general" in text) == winograd_used
    assert ("convolution" in text) != winograd_used
    assert "case" not in text


@pytest.mark.parametrize("kernel_init", sorted(models.KERNEL_INITS))
def test_initialisation_compiled_faster_draws_the_same_bits(kernel_init):
    """backend.init_compiler_options (LLVM level 1 on the CPU, to compile initialisation 3-7x
    faster) changes no bit: a conv and an fc kernel of each kernel_init against XLA's default."""
    init = models.KERNEL_INITS[kernel_init]

    def draw(key):
        conv, fc = jax.random.split(key)
        return init(conv, (3, 3, 64, 128), jnp.float32), init(fc, (512, 10), jnp.float32)

    options = backend.init_compiler_options()
    assert options == backend.INIT_COMPILER_OPTIONS
    fast = jax.jit(draw, compiler_options=options)(jax.random.key(0))
    for a, b in zip(fast, jax.jit(draw)(jax.random.key(0))):
        np.testing.assert_array_equal(a, b)


def test_both_initialisations_compile_with_those_options(monkeypatch, tiny_config):
    """models.init_variables and Trainer.init pass them to XLA (a bad one is refused), and a
    user's own XLA_FLAGS setting of one of them wins (none passed)."""
    monkeypatch.setattr(backend, "INIT_COMPILER_OPTIONS", {"xla_vggjax_no_such_option": 1})
    with pytest.raises(Exception, match="xla_vggjax_no_such_option"):
        models.init_variables(models.model_from_config(tiny_config), jax.random.key(0))
    with pytest.raises(Exception, match="xla_vggjax_no_such_option"):
        train.Trainer(tiny_config, sharding.make_mesh()).init(jax.random.key(0))
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_vggjax_no_such_option=2"
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    assert backend.init_compiler_options() == {}


def test_rgb_padding_on_a_gpu_is_the_same_convolution(monkeypatch):
    """Issue 11's candidate (convolution.RGB_PAD_ON_GPU): on a GPU conv1_1 convolves 8 channels,
    5 of them zero, with the same output and gradients as on 3, and the same parameters."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
    dy = jax.random.normal(jax.random.key(2), (2, 32, 32, 16))
    loss = lambda x, k: (_layer_conv(x, k) * dy).sum()
    want = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, kernel)
    monkeypatch.setattr(convolution, "RGB_PAD_ON_GPU", 8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # traced as for a GPU, run here
    assert "tensor<3x3x8x16xf32>" in jax.jit(_layer_conv).lower(x, kernel).as_text()
    got = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, kernel)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-3)
    shapes = models.abstract_variables(models.create_model("A", width=0.125, crop_size=32))
    assert shapes["params"]["conv1_1"]["kernel"].shape == (3, 3, 3, 8)


_VGG16_3X3 = [(224, 3), (224, 64), (112, 64), (112, 128), (56, 128)] + [(56, 256)] * 2
_VGG16_3X3 += [(28, 256)] + [(28, 512)] * 2 + [(14, 512)] * 3


@pytest.mark.parametrize(
    "setting, kind, first, last",
    [
        ("huge_pages", "train", 1, 13),
        ("huge_pages", "infer", 2, 13),
        ("small_pages", "train", 3, 10),
        ("small_pages", "infer", 3, 10),
        ("all", "train", 0, 13),
        ("off", "train", 0, 0),
    ],
)
def test_each_setting_picks_winograd_where_it_was_faster(monkeypatch, setting, kind, first, last):
    """VGG16 at 224 (winograd.RULES): with huge pages every layer from conv1_2 on when
    training, from conv2_1 on when inferring; without, conv2_2 to conv4_3; "all": every 3×3
    layer; "off": none."""
    model = models.create_model("D", winograd=setting)
    variables, picked, worth_it = models.abstract_variables(model), [], winograd.worth_it

    def recording(x_shape, kernel_shape, dtype, k, rules):
        chosen = worth_it(x_shape, kernel_shape, dtype, k, rules)
        picked.extend([x_shape[2:]] if k == kind and chosen else [])
        return chosen

    monkeypatch.setattr(winograd, "worth_it", recording)
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 224, 224, 3)))
    assert picked == [(side, channels) for side, channels in _VGG16_3X3[first:last]]


def test_inference_and_training_each_get_their_own_pick():
    """With huge pages conv1_2 (224 px, 64 channels) is Winograd's when differentiated, XLA's
    convolution when not: the custom JVP's plain body runs only where no derivative is taken."""
    x, kernel = jnp.zeros((1, 224, 224, 64)), jnp.zeros((3, 3, 64, 64))
    conv = lambda x, k: _layer_conv(x, k, "huge_pages")
    forward = jax.jit(conv).lower(x, kernel).as_text()
    grads = jax.jit(jax.grad(lambda x, k: conv(x, k).sum(), (0, 1))).lower(x, kernel).as_text()
    assert "convolution" in forward and "dot_general" not in forward
    assert "dot_general" in grads and "convolution" not in grads


def test_a_vggjax_program_restarts_itself_with_fast_memory():
    """`tune_cpu(restart=True)`, as vggjax's command lines call it, runs the program again, same
    process, with glibc's tunable and (where the system has it) tcmalloc preloaded, once; a
    large array then sits on huge pages under glibc's malloc. The user's values win."""
    if not backend._can_use_huge_pages():
        pytest.skip("needs Linux, glibc >= 2.35 and transparent huge pages")
    code = (
        "import os, sys; print('start', os.getpid()); import vggjax; vggjax.tune_cpu(restart=True)\n"
        "import numpy as np; a = np.ones(64 << 20, np.uint8); at = a.ctypes.data\n"
        "vma = open('/proc/self/smaps').read().split('\\n')\n"
        "start = next(i for i, l in enumerate(vma) if '-' in l.split(' ')[0] and"
        " int(l.split('-')[0], 16) <= at < int(l.split(' ')[0].split('-')[1], 16))\n"
        "huge = next(l for l in vma[start:] if l.startswith('AnonHugePages'))\n"
        "print(os.environ.get('GLIBC_TUNABLES'), int(huge.split()[1]) > 0)\n"
        "print(repr(os.environ.get('LD_PRELOAD')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    users = {"": {}, "hugetlb=0": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LD_PRELOAD": ""}}
    runs = {
        name: subprocess.run(
            [sys.executable, "-c", code],
            env=dict(env, PYTHONPATH=ROOT, **given),
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split("\n")
        for name, given in users.items()
    }
    first, again, pages, preload = runs[""][:4]
    assert first == again and first.startswith("start")  # ran twice, as one process
    assert preload == repr(backend.fast_malloc())
    if backend.fast_malloc() is None:  # tcmalloc takes memory from the kernel its own way
        assert pages == "glibc.malloc.hugetlb=1 True"
    assert runs["hugetlb=0"][1:3] == ["glibc.malloc.hugetlb=0 False", "''"]


def test_fast_memory_leaves_what_the_user_set(monkeypatch):
    monkeypatch.setattr(backend, "_can_use_huge_pages", lambda: True)
    monkeypatch.setattr(backend, "fast_malloc", lambda: "libtcmalloc_minimal.so.4")
    assert backend.fast_memory_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        "LD_PRELOAD": "libtcmalloc_minimal.so.4",
    }
    given = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LD_PRELOAD": ""}
    assert backend.fast_memory_environment(given) == {}
    assert backend.malloc({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}) == "tcmalloc"
    assert backend.malloc({}) == "glibc"
    monkeypatch.setattr(backend, "fast_malloc", lambda: None)
    assert backend.fast_memory_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == {}


def test_huge_pages_reads_the_tunable(monkeypatch):
    monkeypatch.setattr(backend, "_thp_mode", lambda: "madvise")
    assert backend.huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
    assert not backend.huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not backend.huge_pages({})
    monkeypatch.setattr(backend, "_thp_mode", lambda: "always")
    assert backend.huge_pages({})
    assert backend.with_huge_pages("", True) == "glibc.malloc.hugetlb=1"
    assert (
        backend.with_huge_pages("a=1:glibc.malloc.hugetlb=1", False) == "a=1:glibc.malloc.hugetlb=0"
    )


def test_default_float32_gradients_match_float64(monkeypatch):
    """VGG net B, width 1 at 64×64 (Winograd from conv1_2 on: huge pages, as vggjax's programs
    run; without them a subset of these layers), glorot init, 2 images: every
    layer's float32 kernel gradient against float64's, with float64 held to float32's ReLU
    and max-pooling decisions (benchmarks/grad_accuracy.py; where float32 and float64 decide
    differently the gradient moves to another pixel, max-pooling's kink, not arithmetic).
    Measured here: at most 4.4e-6 of each layer's gradient norm (conv1_1, below four Winograd
    layers; 2e-6 with one), what float32 rounding over reductions of 1e3-1e5 terms and the
    transforms give; the bound, 1e-5, fails for matrix products rounded to
    TF32 or bfloat16 (1e-3 and worse) or a transform off by one term."""
    model = models.create_model(
        "B", 10, fc_width=64, crop_size=64, kernel_init="glorot", winograd="huge_pages"
    )
    params = models.init_variables(model, jax.random.key(0))["params"]
    images = np.random.default_rng(0).normal(0, 50, (2, 64, 64, 3)).astype(np.float32)
    labels = np.array([3, 7])
    loss = lambda p: grad_accuracy.cross_entropy(model.apply({"params": p}, images), labels)
    grads = jax.jit(jax.grad(loss))(params)
    masks = grad_accuracy.decisions(model, params, images)
    ref = grad_accuracy.float64_gradients(model, params, images, labels, masks)
    errors = {n: grad_accuracy.relative(grads[n]["kernel"], ref[n]["kernel"]) for n in grads}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("form", ["patches_conv", "map_conv"])
@pytest.mark.parametrize(
    "shape, kernel",
    [((3, 2, 2, 8), 3), ((3, 1, 1, 8), 3), ((3, 1, 3, 5), 3), ((2, 9, 7, 3), 3), ((2, 4, 4, 3), 5)],
)
def test_small_map_convolutions_equal_xla_through_every_transformation(form, shape, kernel):
    """convolution.patches_conv and map_conv (2×2 and smaller maps, conv1_1's 3 channels, a 5×5
    kernel on a map smaller than it, taps left out) against XLA's convolution: output, both
    gradients, and the forward-mode tangent against the reverse-mode one (plain JAX operations:
    no custom rule), to float32 rounding."""
    _check_against_xla(getattr(convolution, form), shape, kernel)


@pytest.mark.parametrize("shape, kernel", [((2, 9, 7, 3), 3), ((3, 2, 2, 1), 3), ((2, 6, 5, 4), 5)])
def test_rgb_convolution_equals_xla_through_every_transformation(shape, kernel):
    """convolution.rgb_conv (conv1_1's few input channels: multiply-adds in a conditional, XLA's
    derivatives by a custom JVP) against XLA's convolution as the small-map forms are, under
    vmap too, and on a kernel holding a NaN (the conditional's other branch: NaN where XLA's)."""
    _check_against_xla(convolution.rgb_conv, shape, kernel)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, *shape)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 6)), jnp.float32)
    batched = jax.vmap(convolution.rgb_conv, (0, None))(x, k)
    np.testing.assert_allclose(batched, jax.vmap(winograd.direct, (0, None))(x, k), atol=1e-5)
    bad = k.at[0, 0, 0, 0].set(jnp.nan)
    np.testing.assert_array_equal(
        np.isnan(convolution.rgb_conv(x[0], bad)), np.isnan(winograd.direct(x[0], bad))
    )


def test_conv1_1_by_products_on_the_cpu_under_every_setting_but_off():
    """A 3-channel float32 layer goes to rgb_conv (a conditional in the program) under every
    Winograd setting but "off", and in bfloat16 to XLA's convolution alone."""
    x, k = jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))
    for setting, dtype, products in (
        ("huge_pages", jnp.float32, True),
        ("off", jnp.float32, False),
        ("huge_pages", jnp.bfloat16, False),
    ):
        text = jax.jit(functools.partial(_layer_conv, setting=setting))
        text = text.lower(x.astype(dtype), k.astype(dtype)).as_text()
        assert ("stablehlo.case" in text or "stablehlo.if" in text) == products, (setting, dtype)


def test_patches_where_xla_is_slowest_under_every_setting_but_off():
    """vgg11_bn at a 32 crop: conv5_1 and conv5_2 (2×2 maps) are one matrix product each, the
    rest XLA's convolution; "off" leaves all eight to XLA."""
    model = models.create_model("vgg11_bn", 10, width=0.25, fc_width=16, crop_size=32)
    x = jnp.zeros((2, 32, 32, 3))
    for setting, convolutions in (("huge_pages", 6), ("small_pages", 6), ("off", 8)):
        net = model.clone(spec=dataclasses.replace(model.spec, winograd=setting))
        variables = models.abstract_variables(net)
        text = jax.jit(net.apply).lower(variables, x).as_text()
        assert text.count("stablehlo.convolution") == convolutions, setting


# Helpers


def _check_against_xla(conv, shape: tuple[int, ...], kernel: int) -> None:
    """`conv` against XLA's convolution: output, both gradients and the tangent against the
    reverse mode's, to float32 rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 6)), jnp.float32)
    dx, dk = jnp.asarray(rng.normal(size=x.shape), jnp.float32), k[::-1] * 0.5
    y, vjp = jax.vjp(conv, x, k)
    want, want_vjp = jax.vjp(winograd.direct, x, k)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, ref in zip((y, *vjp(dy)), (want, *want_vjp(dy))):
        assert grad_accuracy.relative(got, ref) < 1e-6
    tangent = jax.jvp(conv, (x, k), (dx, dk))[1]
    dot = lambda a, b: np.vdot(np.float64(a), np.float64(b))  # no float32 sum of the products
    np.testing.assert_allclose(
        dot(tangent, dy), dot(vjp(dy)[0], dx) + dot(vjp(dy)[1], dk), rtol=1e-5
    )


def _layer_conv(x: jax.Array, kernel: jax.Array, setting: str = "auto") -> jax.Array:
    """A 3×3 conv layer's call of convolution.conv_general_dilated, as flax.linen.Conv makes it."""
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, winograd.NHWC)
    return convolution.conv_general_dilated(
        x, kernel, (1, 1), "SAME", winograd=setting, dimension_numbers=dn
    )


def _convolution_in_subprocess(xla_flags: str, off: bool = False) -> dict[str, str]:
    """Calls vggjax.tune_cpu under `xla_flags` (and VGGJAX_CPU_TUNING=0 if `off`), compiles a
    convolution and a matrix product; XLA_FLAGS, device count, whether the compiled program hands
    either to YNNPACK, what tune_cpu returned and the Winograd setting."""
    code = (
        "import os, jax, jax.numpy as jnp, vggjax\n"
        "from vggjax import convolution\n"
        "tuned = vggjax.tune_cpu()\n"
        "x, k = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))\n"
        "conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',"
        " dimension_numbers=('NHWC', 'HWIO', 'NHWC')).reshape(64, 2048) @ jnp.ones((2048, 16))\n"
        "text = jax.jit(conv).lower(x, k).compile().as_text()\n"
        "print(os.environ['XLA_FLAGS']); print(jax.device_count()); print('__ynn_fusion' in text)\n"
        "print(tuned); print(convolution.in_effect())\n"
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env[backend.OFF_SWITCH] = "0" if off else "1"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    keys = ("XLA_FLAGS", "devices", "ynn", "tuned", "winograd")
    return dict(zip(keys, result.stdout.strip().split("\n")))
