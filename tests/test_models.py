"""Table 1 configurations: shapes, parameter counts (Table 2), classic vs dense form, LRN, BN."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init, narrow

from vggjax import models, objectives, options, pretrained, recipe, summary
from vggjax.errors import UserError

# Table 2 and torchvision's counts (A-LRN has no parameters beyond A; C adds three 1×1 convs).
PARAM_COUNTS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
}
CONV_LAYERS = {"A": 8, "A-LRN": 8, "B": 10, "C": 13, "D": 13, "E": 16, "B-shallow": 5}


@pytest.fixture(scope="module")
def narrow_a():
    model = narrow("A")
    return model, init(model)


@pytest.mark.parametrize("name,count", PARAM_COUNTS.items())
def test_parameter_counts_match_table_2_and_torchvision(name, count):
    variables = models.abstract_variables(models.create_model(name))
    assert models.count_params(variables["params"]) == count


@pytest.mark.parametrize(
    "alias,config",
    [
        ("vgg11", "A"),
        ("vgg11_lrn", "A-LRN"),
        ("vgg13", "B"),
        ("vgg16", "D"),
        ("VGG19", "E"),
        ("vgg16_c", "C"),
    ],
)
def test_aliases(alias, config):
    model = models.create_model(alias)
    assert (model.config, model.batch_norm) == (config, False)


@pytest.mark.parametrize("name", list(models.TABLE_1))
def test_layers_follow_table_1(name):
    params = models.abstract_variables(narrow(name))["params"]
    convs = [k for k in params if k.startswith("conv")]
    assert len(convs) == CONV_LAYERS[name]
    assert sorted(k for k in params if k.startswith("fc")) == ["fc6", "fc7", "fc8"]
    # Channels double per stage up to 512 (×1/16 here); the last stage keeps 512.
    last = {int(k[4]): params[k]["kernel"].shape[-1] for k in convs}
    assert [last[s] for s in range(1, 6)] == [4, 8, 16, 32, 32]
    # C's third conv of stages 3–5 is 1×1; the shallow net uses 5×5.
    if name == "C":
        assert [params[f"conv{s}_3"]["kernel"].shape[:2] for s in (3, 4, 5)] == [(1, 1)] * 3
    if name == "B-shallow":
        assert all(params[k]["kernel"].shape[:2] == (5, 5) for k in convs)


@pytest.mark.parametrize("name,gmacs", [("D", 15.47), ("E", 19.63)])
def test_summary_counts_flops_and_agrees_with_the_module(name, gmacs):
    model = models.create_model(name)
    rows = summary.layer_rows(model)
    assert round(sum(r.macs for r in rows) / 1e9, 2) == gmacs
    assert sum(r.params for r in rows) == PARAM_COUNTS[name]
    assert rows[-1].shape == (1, 1, 1000)


@pytest.mark.parametrize("name", list(models.TABLE_1) + ["vgg16_bn"])
def test_summary_params_equal_module_params_for_narrow_nets(name):
    model = narrow(name)
    variables = models.abstract_variables(model)
    assert sum(r.params for r in summary.layer_rows(model)) == models.count_params(
        variables["params"]
    )


def test_dense_form_at_crop_size_equals_classic_logits_full_vgg16():
    model = models.create_model("D")
    variables = models.init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 224, 224, 3)) * 60.0
    classic = model.apply(variables, x, train=False)
    dense = model.apply(variables, x, dense=True)
    assert classic.shape == (2, 1000) and dense.shape == (2, 1, 1, 1000)
    rel = jnp.abs(dense[:, 0, 0] - classic).max() / jnp.abs(classic).max()
    assert rel < 1e-4


@pytest.mark.parametrize("name", ["A-LRN", "C", "vgg13_bn", "B-shallow"])
def test_dense_equals_classic_for_other_configurations(name):
    model = narrow(name, crop=224)
    variables = init(model)
    x = jax.random.normal(jax.random.key(1), (2, 224, 224, 3)) * 60.0
    classic = model.apply(variables, x)
    dense = model.apply(variables, x, dense=True)[:, 0, 0]
    assert float(jnp.abs(classic).max()) > 0
    np.testing.assert_allclose(dense, classic, rtol=0, atol=1e-4 * float(jnp.abs(classic).max()))


@pytest.mark.parametrize(
    "crop,hw,expected",
    [
        (224, (256, 352), (2, 5)),
        (224, (224, 480), (1, 9)),
        (224, (250, 255), (1, 1)),
        (64, (96, 160), (2, 4)),
    ],
)
def test_score_map_shape(crop, hw, expected):
    model = narrow("A", crop=crop)
    variables = models.abstract_variables(model)
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, dense=True),
        variables,
        jax.ShapeDtypeStruct((3, *hw, 3), jnp.float32),
    )
    assert out.shape == (3, *expected, 10)


def test_fc_as_conv_is_the_flattened_fc():
    kernel = jax.random.normal(jax.random.key(0), (2 * 2 * 3, 5))
    fmap = jax.random.normal(jax.random.key(1), (1, 2, 2, 3))
    conv = jax.lax.conv_general_dilated(
        fmap,
        models.fc_as_conv(kernel, 2),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(conv[0, 0, 0], fmap.reshape(1, -1)[0] @ kernel, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 5, 4), (1, 1, 3, 2)])
def test_max_pool_is_flax_max_pool_with_the_reduction_derivative(shape):
    """models.max_pool (strided slices, custom JVP): flax's values, floor included; the gradient
    and the forward-mode tangent of a max over each window of a reshape, ties (ReLU's zeros,
    repeated values) sharing it evenly, to float32 rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-2, 3, size=shape), jnp.float32)  # many ties
    dx = jnp.asarray(rng.normal(size=shape), jnp.float32)
    (n, h, w, c) = shape

    def reduction(x):
        x = x[:, : h // 2 * 2, : w // 2 * 2]
        return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    pool = lambda x: models.max_pool(x, (2, 2), (2, 2))
    np.testing.assert_array_equal(pool(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    dy = jnp.asarray(rng.normal(size=pool(x).shape), jnp.float32)
    gradient = lambda f: jax.jit(jax.grad(lambda x: jnp.vdot(f(x), dy)))(x)
    np.testing.assert_allclose(gradient(pool), gradient(reduction), rtol=1e-6)
    np.testing.assert_allclose(jax.jvp(pool, (x,), (dx,))[1], jax.jvp(reduction, (x,), (dx,))[1])


def test_lrn_matches_krizhevsky_formula():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 9)).astype(np.float32) * 20
    p = models.LRN_PARAMS
    expected = np.empty_like(x)
    for c in range(x.shape[-1]):
        lo, hi = max(0, c - p["size"] // 2), min(x.shape[-1], c + p["size"] // 2 + 1)
        denom = (p["k"] + p["alpha"] * (x[..., lo:hi] ** 2).sum(-1)) ** p["beta"]
        expected[..., c] = x[..., c] / denom
    np.testing.assert_allclose(models.local_response_norm(jnp.asarray(x), **p), expected, rtol=1e-5)


def test_batch_norm_train_and_eval_modes():
    model = narrow("vgg11_bn")
    variables = init(model)
    assert "batch_stats" in variables and "conv1_1_bn" in variables["batch_stats"]
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3)) * 50
    rngs = {"dropout": jax.random.key(2)}
    out, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    # Training normalises with the batch's statistics and moves the running averages.
    before = variables["batch_stats"]["conv1_1_bn"]["mean"]
    after = updates["batch_stats"]["conv1_1_bn"]["mean"]
    assert not np.allclose(before, after)
    # Evaluation uses the running averages: an image's output does not depend on its batch.
    alone = model.apply(variables, x[:1])
    in_batch = model.apply(variables, x)[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-6)
    # ...while in training mode it does.
    train_alone = model.apply(variables, x[:2], train=True, rngs=rngs, mutable=["batch_stats"])[0]
    assert not np.allclose(train_alone[:1], out[:1], atol=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_equals_flax_batch_norm(masked):
    """models.BatchNorm (every sum a matrix product, for XLA's CPU backend) against Flax's with
    the settings it replaces: output, running averages, and the gradients of both parameters and
    the input, in training (a masked image left out of the statistics) and inference, to
    float32 rounding; the same variables."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3, 2, (4, 5, 3, 6)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    counted = (jnp.arange(4) != 2).reshape(-1, 1, 1, 1) if masked else None
    ours = lambda train: models.BatchNorm(use_running_average=not train)
    flax_bn = lambda train: nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=models.BN_EPSILON,
        use_fast_variance=False,
    )
    variables = flax_bn(True).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours(True).init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    variables = jax.tree.map(
        lambda v: v + jnp.asarray(rng.normal(size=v.shape), jnp.float32), variables
    )
    variables["batch_stats"]["var"] = jnp.abs(variables["batch_stats"]["var"])
    for train in (True, False):

        def run(bn, kwargs, params, x):
            y, updates = bn.apply(
                {**variables, "params": params}, x, mutable=["batch_stats"], **kwargs
            )
            return (y * dy).sum(), (y, updates)

        results = [
            jax.value_and_grad(run, (2, 3), has_aux=True)(bn(train), kwargs, variables["params"], x)
            for bn, kwargs in ((ours, dict(counted=counted)), (flax_bn, dict(mask=counted)))
        ]
        for got, want in zip(*(jax.tree.leaves(r) for r in results)):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_a_conv_bias_folded_into_batch_norm_is_the_bias_added():
    """`Conv` has nn.Conv's parameters (same initial values) and output (convolution + bias), and
    BatchNorm(x, shift=b) is BatchNorm(x + b): output, running averages and gradients, in
    training (where the bias's gradient is exactly zero) and inference, to float32 rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3, 2, (4, 6, 6, 5)), jnp.float32)
    init_fn = models.KERNEL_INITS["he"]
    ours = models.Conv(7, 3, init_fn, jnp.float32, "off")
    theirs = nn.Conv(7, (3, 3), padding="SAME", kernel_init=init_fn)
    conv_params = ours.init(jax.random.key(1), x)
    assert jax.tree.all(
        jax.tree.map(np.array_equal, conv_params, theirs.init(jax.random.key(1), x))
    )
    conv_params = {"params": {"kernel": conv_params["params"]["kernel"], "bias": jnp.arange(7.0)}}
    y, b = ours.apply(conv_params, x)
    np.testing.assert_allclose(y + b, theirs.apply(conv_params, x), rtol=1e-5, atol=1e-5)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for train in (True, False):
        bn = models.BatchNorm(use_running_average=not train)
        variables = bn.init(jax.random.key(0), y)
        variables["batch_stats"]["mean"] = jnp.linspace(-1.0, 1.0, 7)

        def run(folded, y, b, params, bn=bn, variables=variables):
            args = (y, None, b) if folded else (y + b,)
            out, updates = bn.apply({**variables, "params": params}, *args, mutable=["batch_stats"])
            return (out * dy).sum(), (out, updates)

        results = [
            jax.value_and_grad(run, (1, 2, 3), has_aux=True)(folded, y, b, variables["params"])
            for folded in (True, False)
        ]
        for got, want in zip(*(jax.tree.leaves(r) for r in results)):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
        if train:
            assert not np.any(results[0][1][1])  # the shift's gradient: exactly zero


def test_dropout_only_in_training(narrow_a):
    model, variables = narrow_a
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3)) * 50
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


def test_bfloat16_compute_keeps_float32_params(narrow_a):
    model, variables = narrow_a
    bf16 = narrow("A", dtype=jnp.bfloat16)
    assert jax.tree.map(jnp.shape, models.abstract_variables(bf16)) == jax.tree.map(
        jnp.shape, variables
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3)) * 50
    out = bf16.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        out.astype(jnp.float32),
        model.apply(variables, x),
        rtol=0.1,
        atol=0.05 * float(jnp.abs(out).max()),
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="vgg17"), "unknown model 'vgg17'"),
        (dict(name="D", crop_size=100), "multiple of 32"),
        (dict(name="D", width=0), "positive"),
        (dict(name="D", kernel_init="zeros"), "kernel_init must be one of"),
    ],
)
def test_create_model_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(**kwargs)


@pytest.mark.parametrize(
    "shape,dense,message",
    [
        ((1, 64, 64, 4), False, "3 \\(RGB\\) channels"),
        ((1, 64, 64), False, "3 \\(RGB\\) channels"),
        ((1, 63, 100, 3), True, "at least 64×64"),
        ((1, 96, 96, 3), False, "takes 64×64 crops"),
    ],
)
def test_bad_inputs_get_clear_errors(shape, dense, message):
    model = narrow("A")
    variables = models.abstract_variables(model)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, dense=dense),
            variables,
            jax.ShapeDtypeStruct(shape, jnp.float32),
        )


def test_batch_norm_statistics_stay_exact_when_the_mean_dwarfs_the_spread():
    """Batch statistics as E[(x − mean)²], not E[x²] − mean²: with |mean| ≈ 1000 × std the
    latter loses most of float32's digits, and a reduction in another order (two hosts instead
    of one) then changed the update by 10% within 4 steps. Checked on conv1_1's batch variance
    against float64."""
    model = narrow("vgg11_bn", crop=32)
    variables = init(model)
    variables["params"]["conv1_1"]["bias"] += 1000.0  # conv1_1's outputs: mean ≈ 1000, spread ≈ 1
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3))
    _, updates = model.apply(
        variables,
        jnp.asarray(x, jnp.float32),
        train=True,
        output="conv1_1",
        mutable=["batch_stats"],
    )
    # Running averages start at var 1 with momentum 0.9: new = 0.9 + 0.1 · batch variance.
    got = (np.asarray(updates["batch_stats"]["conv1_1_bn"]["var"], np.float64) - 0.9) / 0.1
    kernel = np.asarray(variables["params"]["conv1_1"]["kernel"], np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(padded[:, i : i + 32, j : j + 32] @ kernel[i, j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(got, y.var((0, 1, 2)), rtol=1e-3)


def test_fc8_is_sized_for_every_objective_and_only_those():
    """The net sizes fc8 (models) for exactly the objectives training knows (objectives)."""
    assert set(models.FC8_OUTPUTS) == set(objectives.OBJECTIVES)
    widths = {name: models.FC8_OUTPUTS[name](10) for name in ("classification", "scr", "pcr")}
    assert widths == dict(classification=10, scr=4, pcr=40)


# A value each model field refuses: a new field of models.ModelSpec must be given one here.
BAD_VALUES = dict(
    model="vgg17",
    num_classes=0,
    objective="boxes",
    width=0.0,
    fc_width=0,
    crop_size=100,
    dropout_rate=1.0,
    kernel_init="zeros",
    dtype="int8",
    winograd="sometimes",
)


def test_the_model_fields_are_defined_once_and_read_everywhere(tmp_path):
    """models.ModelSpec is what the net, the configs (recipe.py's defaults), config.json
    (MODEL_FIELDS) and pretrained inheritance read."""
    fields = {field.name: field.default for field in dataclasses.fields(models.ModelSpec)}
    assert tuple(fields) == models.MODEL_FIELDS and set(BAD_VALUES) == set(fields)
    c = recipe.paper_recipe("D")
    # The recipe's own choices: the net it is given, and Glorot's init past net A.
    assert {k: c[k] for k in fields} == fields | dict(model="D", kernel_init="glorot")
    assert models.create_model("D").spec == models.ModelSpec()
    assert models.model_from_config({"model": "D"}).spec == models.ModelSpec()
    # A checkpoint's net is the fields fixing its parameters' shapes; how a run computed is not.
    net = dict(model="B", num_classes=7, objective="scr", width=0.5, fc_width=32, crop_size=64)
    how = dict(dropout_rate=0.1, kernel_init="he", dtype="bfloat16", winograd="all")
    (tmp_path / "config.json").write_text(json.dumps(net | how | dict(mean_rgb=[1, 2, 3])))
    assert models.fields_fixing("conv", "fc", "fc8") == tuple(net)
    inherited = pretrained.with_net_of(c, str(tmp_path))
    assert {k: inherited[k] for k in fields} == {k: c[k] for k in fields} | net
    kept = pretrained.with_net_of(c, str(tmp_path), keep_classes=True)
    assert (kept.num_classes, kept.objective, kept.model) == (1000, "classification", "B")


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_bad_model_field_is_refused_in_one_line_naming_it(field):
    c = recipe.paper_recipe("D")
    c[field] = BAD_VALUES[field]
    with pytest.raises(UserError) as config_error:
        options.validate(c)
    args = dict(name="D") | ({"name": "vgg17"} if field == "model" else {field: BAD_VALUES[field]})
    with pytest.raises(UserError) as library_error:
        models.create_model(**args)
    for error, prefix in ((config_error, "config."), (library_error, "")):
        message = str(error.value)
        named = "unknown model 'vgg17'; choose one of" if field == "model" else prefix + field
        assert "\n" not in message and message.startswith(named), message
