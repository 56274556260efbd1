"""vggjax next to PyTorch: the same VGG train step and forward pass, timed in one run.

    pip install -e '.[bench]'       # PyTorch; not needed by vggjax
    python benchmarks/torch_train_step.py --model=D --batch_size=8 --image_size=224 --steps=3

The PyTorch net is torchvision's layout (`features`, 7×7 adaptive average pool, `classifier`)
built here from vggjax's layer table, so both run the same layers; the step is the same too:
cross-entropy, dropout 0.5, SGD with momentum 0.9 and weight decay 5e-4. JAX and PyTorch take
turns, `--rounds` times `--steps` steps each, so both see the same machine load; the figures are
each one's best round. Each PyTorch variant runs in a process of its own, idle (blocked on a pipe)
while the others run: in one process, a VGG16 train step of JAX's ran at 5.3-5.6 s after PyTorch
had trained there against 3.7-4.0 s before (2-core CPU), and PyTorch's moved too. Both run on
JAX's platform: the GPU (CUDA) if JAX has one, else the CPU. Ends with one JSON line: images/s for
both, and JAX ÷ PyTorch.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
from typing import Any

# On a GPU, JAX takes 75% of its memory at start by default; PyTorch, in its own process
# (`torch_process`), needs room beside it: each gets under half.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import ml_collections
import numpy as np
import train_step  # benchmarks/train_step.py: its flags, config and JAX runners
from absl import app, flags

from vggjax import backend, cli, models

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timed rounds per framework.")
_CHANNELS_LAST = flags.DEFINE_bool(
    "torch_channels_last", False, "PyTorch in channels-last memory format (NHWC)."
)
_VARIANTS = {"both": ["eager", "compiled"], "eager": ["eager"], "compiled": ["compiled"]}
_COMPILE = flags.DEFINE_enum(
    "torch_compile",
    "both",
    list(_VARIANTS),
    "PyTorch eager, torch.compile (default mode), or both.",
)
_HUGE_PAGES = flags.DEFINE_bool(
    "torch_huge_pages",
    False,
    "PyTorch's processes with glibc's huge pages too (vggjax's programs use them by default: "
    "vggjax.backend); off: PyTorch as it runs by default.",
)
_WARMUP = 3  # calls before timing: torch.compile traces twice (momentum buffers appear at step 1)


def torch_vgg(model: models.VGG):
    """torchvision's VGG for `model`'s layer table (same layers, same parameter count)."""
    from torch import nn

    features, channels = [], 3
    for layer in model.layers:
        if layer.kind == "conv":
            features.append(
                nn.Conv2d(channels, layer.features, layer.kernel, padding=layer.kernel // 2)
            )
            if model.batch_norm:
                features.append(nn.BatchNorm2d(layer.features))
            features.append(nn.ReLU(inplace=True))
            channels = layer.features
        elif layer.kind == "lrn":  # PyTorch divides alpha by the size; vggjax does not
            lrn = models.LRN_PARAMS
            features.append(
                nn.LocalResponseNorm(lrn["size"], lrn["alpha"] * lrn["size"], lrn["beta"], lrn["k"])
            )
        elif layer.kind == "pool":
            features.append(nn.MaxPool2d(2, 2))
    fc6, fc7, fc8 = (layer.features for layer in model.layers if layer.kind == "fc")
    window = model.crop_size // 32
    return nn.Sequential(
        nn.Sequential(*features),
        nn.AdaptiveAvgPool2d((window, window)),
        nn.Flatten(),
        nn.Linear(channels * window * window, fc6),
        nn.ReLU(True),
        nn.Dropout(model.dropout_rate),
        nn.Linear(fc6, fc7),
        nn.ReLU(True),
        nn.Dropout(model.dropout_rate),
        nn.Linear(fc7, fc8),
    )


def load_vggjax(net, model: models.VGG, variables: dict[str, Any]) -> None:
    """vggjax's variables into `torch_vgg(model)`'s modules: HWIO kernels as OIHW, fc6's rows
    from NHWC's flattening to NCHW's (the inverse of vggjax.convert's torchvision reader)."""
    import torch

    params, stats = variables["params"], variables.get("batch_stats", {})
    convs = [layer.name for layer in model.layers if layer.kind == "conv"]
    fcs = [layer for layer in model.layers if layer.kind == "fc"]
    modules = lambda kind: [m for m in net.modules() if isinstance(m, kind)]
    as_tensor = lambda a: torch.from_numpy(np.array(a))  # a writable copy
    with torch.no_grad():
        for name, conv in zip(convs, modules(torch.nn.Conv2d), strict=True):
            conv.weight.copy_(as_tensor(np.transpose(params[name]["kernel"], (3, 2, 0, 1))))
            conv.bias.copy_(as_tensor(params[name]["bias"]))
        for name, norm in zip(convs, modules(torch.nn.BatchNorm2d)):
            p, s = params[f"{name}_bn"], stats[f"{name}_bn"]
            for tensor, value in zip(
                (norm.weight, norm.bias, norm.running_mean, norm.running_var),
                (p["scale"], p["bias"], s["mean"], s["var"]),
            ):
                tensor.copy_(as_tensor(value))
        for layer, linear in zip(fcs, modules(torch.nn.Linear), strict=True):
            kernel = np.asarray(params[layer.name]["kernel"]).T  # (out, in)
            if layer is fcs[0]:  # its inputs flattened NHWC → NCHW, as torch flattens them
                window = layer.kernel  # fc6's window over the last map (the layer table's)
                kernel = kernel.reshape(kernel.shape[0], window, window, -1).transpose(0, 3, 1, 2)
            linear.weight.copy_(as_tensor(kernel.reshape(kernel.shape[0], -1)))
            linear.bias.copy_(as_tensor(params[layer.name]["bias"]))


def torch_device() -> str:
    """JAX's platform, for PyTorch: "cuda" if JAX runs on a GPU, else "cpu"."""
    import jax

    return "cuda" if jax.devices()[0].platform == "gpu" else "cpu"


def torch_settings(device: str, dtype: str) -> dict[str, Any]:
    """Turns on PyTorch's GPU fast paths (its defaults leave them off); what it runs with."""
    import torch

    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # autotunes each convolution for its shapes
        if dtype == "float32":  # TF32, as XLA's default precision lets JAX use on this GPU
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    return dict(
        torch=torch.__version__,
        torch_malloc=backend.malloc(),  # inherited from vggjax's restart (backend.use_fast_memory)
        torch_threads=torch.get_num_threads(),
        torch_cudnn_benchmark=torch.backends.cudnn.benchmark,
        torch_tf32=dict(
            conv=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32
        ),
    )


def torch_runners(
    c: ml_collections.ConfigDict,
    model: models.VGG,
    num_params: int,
    device: str,
    compiled: bool,
    channels_last: bool,
) -> train_step.Runners:
    """PyTorch's train step and forward pass on one synthetic batch, like `jax_runners`; with
    `compiled`, the net and the optimizer step go through `torch.compile` (default mode), which
    compiles on the first calls (recompiling once the momentum buffers exist)."""
    import torch

    net = torch_vgg(model).to(device)
    assert sum(p.numel() for p in net.parameters()) == num_params, "not the same net"
    optimizer = torch.optim.SGD(
        net.parameters(), lr=c.learning_rate, momentum=c.momentum, weight_decay=c.weight_decay
    )
    generator = torch.Generator().manual_seed(0)
    images = (torch.randn(c.batch_size, 3, c.crop_size, c.crop_size, generator=generator) * 50).to(
        device
    )
    labels = torch.randint(0, c.num_classes, (c.batch_size,), generator=generator).to(device)
    wait = torch.cuda.synchronize if device == "cuda" else lambda: None
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward, optimizer_step = net, optimizer.step
    if compiled:
        forward, optimizer_step = torch.compile(net), torch.compile(optimizer.step)

    # dtype="bfloat16": bfloat16 compute over float32 parameters, as vggjax does.
    autocast = functools.partial(
        torch.autocast, device, torch.bfloat16, enabled=c.dtype == "bfloat16"
    )

    def train_steps(n: int) -> None:
        net.train()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(forward(images).float(), labels)
            loss.backward()
            optimizer_step()
        wait()

    def forward_passes(n: int) -> None:
        net.eval()
        with torch.inference_mode(), autocast():
            for _ in range(n):
                forward(images)
        wait()

    return {"train": train_steps, "infer": forward_passes}


def torch_process(*args: Any) -> tuple[train_step.Runners, dict[str, Any]]:
    """`torch_runners(*args)` in a process of its own (spawned: no state shared with this one),
    and the settings it runs with. Each call of a runner waits for the process to finish; one
    that raised there raises here."""
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = backend.with_huge_pages(tunables, _HUGE_PAGES.value)
    try:  # the spawned interpreter starts with this environment; glibc reads it then
        context.Process(target=_serve, args=(there, *args), daemon=True).start()
    finally:
        os.environ["GLIBC_TUNABLES"] = tunables
    settings = _reply(here)

    def runner(kind: str):
        def run(n: int) -> None:
            here.send((kind, n))
            _reply(here)

        return run

    return {"train": runner("train"), "infer": runner("infer")}, settings


def _serve(conn, c, model, num_params, device, compiled, channels_last) -> None:
    """The PyTorch process: builds the runners, then runs what `conn` asks until it closes."""
    import torch

    try:
        settings = torch_settings(device, c.dtype)
        runners = torch_runners(c, model, num_params, device, compiled, channels_last)
    except Exception as error:
        conn.send(("error", error))
        return
    conn.send(("ok", settings))
    while True:
        try:
            kind, n = conn.recv()
        except EOFError:  # the benchmark is done
            return
        try:
            runners[kind](n)
            if device == "cuda":  # hands its cached blocks back for the others' turns
                torch.cuda.empty_cache()
            conn.send(("ok", None))
        except Exception as error:
            conn.send(("error", error))


def _reply(conn) -> Any:
    status, value = conn.recv()
    if status == "error":
        raise value
    return value


def failure(error: Exception) -> dict[str, str]:
    """A variant that could not run (e.g. torch.compile without a working compiler), for the
    JSON line: the benchmark goes on with the others instead of crashing."""
    return dict(failed=type(error).__name__, error=str(error).strip().split("\n")[0][:300])


def measure(frameworks: dict[str, train_step.Runners], failed: dict) -> dict:
    """Seconds per call, best round, for every (framework, kind) that warmed up; the others
    go into `failed`. Warm-up runs `_WARMUP` calls first, so compiling is never timed, and each
    turn one untimed call: a training run steps back to back, and on the 2-core CPU the first
    JAX train step after a PyTorch turn took 7.4-8.1 s against 4.0-4.5 s for the next (VGG16,
    batch 8; PyTorch idle in its process, using no CPU; not seen after sleeping 5 s alone)."""
    best = {}
    for kind in ("train", "infer"):
        running = {}
        for name, runner in frameworks.items():
            if name in failed:
                continue
            try:
                runner[kind](_WARMUP)
            except Exception as error:
                if name == "jax":
                    raise
                failed[name] = failure(error) | dict(kind=kind)
                continue
            running[name] = runner
        for _ in range(_ROUNDS.value):  # taking turns: every framework sees the same load
            for name, runner in running.items():
                runner[kind](1)  # untimed: the first call after another framework's turn
                seconds = train_step.seconds_per_call(runner[kind], flags.FLAGS.steps)
                best[name, kind] = min(best.get((name, kind), seconds), seconds)
    return best


def ratios(c: ml_collections.ConfigDict, best: dict, variants: list[str]) -> dict:
    """images/s per framework, and JAX ÷ the strongest PyTorch variant measured (named)."""
    result = {}
    for kind in ("train", "infer"):
        for name in ["jax", *variants]:
            if (name, kind) in best:
                result[f"{name}_{kind}_images_per_sec"] = round(c.batch_size / best[name, kind], 2)
        measured = [name for name in variants if (name, kind) in best]
        if measured:
            strongest = min(measured, key=lambda name: best[name, kind])
            result[f"{kind}_torch_strongest"] = strongest.removeprefix("torch_")
            result[f"{kind}_jax_over_torch"] = round(best[strongest, kind] / best["jax", kind], 3)
        for name in measured:
            result[f"{kind}_jax_over_{name}"] = round(best[name, kind] / best["jax", kind], 3)
    return result


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch  # noqa: F401  (imported in the PyTorch processes; checked here)
    except ImportError:
        sys.exit("PyTorch is not installed: pip install -e '.[bench]'")
    import jax

    c = train_step.config()
    trainer, runners, _ = train_step.jax_runners(c)
    num_params = sum(
        x.size for x in jax.tree.leaves(models.abstract_variables(trainer.model)["params"])
    )
    device = torch_device()
    frameworks, failed, settings = {"jax": runners}, {}, {}
    for variant in _VARIANTS[_COMPILE.value]:
        try:
            frameworks[f"torch_{variant}"], settings = torch_process(
                c, trainer.model, num_params, device, variant == "compiled", _CHANNELS_LAST.value
            )
        except Exception as error:
            failed[f"torch_{variant}"] = failure(error)
    best = measure(frameworks, failed)
    result = dict(
        train_step.describe(c),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        **settings,
        torch_processes="one per variant",
        torch_huge_pages=_HUGE_PAGES.value,
        torch_channels_last=_CHANNELS_LAST.value,
        torch_compile=_COMPILE.value,
        steps=flags.FLAGS.steps,
        rounds=_ROUNDS.value,
        warmup=_WARMUP,
    )
    variants = [f"torch_{v}" for v in _VARIANTS[_COMPILE.value]]
    result |= ratios(c, best, variants)
    result |= {f"{name}_failed": why for name, why in failed.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    # As every vggjax command line runs (tune_cpu first); PyTorch's processes: --torch_huge_pages.
    cli.run("torch_train_step", app.run, main)
