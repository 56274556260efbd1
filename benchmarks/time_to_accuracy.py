"""Time to accuracy: vggjax and a PyTorch peer trained on the same real data, epoch for epoch.

    python benchmarks/time_to_accuracy.py --data_dir=DATA     # DATA/{train,val}/<class>/<image>
    python benchmarks/time_to_accuracy.py --data_dir=DATA --epochs=2 --torch_compile=eager
    python benchmarks/time_to_accuracy.py --data_dir=DATA --seeds=0,1,2   # then medians across seeds

Both train the config's net with its recipe (learning rate and its schedule, batch, epochs,
augmentation, initialisation, weight decay) on the same images in the same order, and test on
the `val` split after every epoch. vggjax runs as a user's program would
(`vggjax.train.train_and_evaluate`, images read by its own pipeline); the PyTorch peer as a
PyTorch user at their best would: the images decoded once into tensors (as torchvision's small
data sets are), augmented as tensors on its device, `torch.set_num_threads(cpus)`, channels-last,
denormals flushed, and `torch.compile` where a short probe says it pays for its compilation over
the run (`--torch_compile=auto`). The net is built from vggjax's layer table
(`torch_train_step.torch_vgg`); the peer reproduces vggjax's order of examples exactly
(`stream_order`), not its random numbers: with `--peer_init=vggjax` it starts from the very
variables vggjax's run starts from (a paired comparison: only the augmentation's draws and the
arithmetic's rounding differ), by default from its own draws of the same scheme. A config
option the peer does not implement ends the benchmark in one line (exit 2) before anything
trains.

Clocks: each framework's starts when its run starts, after its imports (vggjax: calling
`train_and_evaluate`; PyTorch: before decoding the training images), so reading the data,
building the net and compiling count. Validation passes do not: an epoch's time ends with its
last step (the progress scalars vggjax writes then), and the validation seconds are given apart
(the peer's test crops are made before its clock starts: vggjax makes its own in its first
validation). vggjax's
epoch times are read from the wall times of the TensorBoard scalars it writes in the workdir.
PyTorch runs first, in a process of its own (probes too), then vggjax in this one: each has the
machine (and the GPU) to itself. Runs unchanged on a GPU: JAX on its default backend, PyTorch
on CUDA when it has it.

Ends with one JSON line: seconds each took to reach `--target` accuracy, each epoch's (seconds,
accuracy), the final accuracies, the host, and vggjax's time ÷ PyTorch's. With --seeds, one
such line per seed (each from a fresh process), then one across them (`across_seeds`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from vggjax import backend, cli
from vggjax.errors import UserError

FLAGS = flags.FlagValues()  # not absl's global registry: torch_train_step's flags live there
_CONFIG = flags.DEFINE_string(
    "config", "configs/small_images.py", "Config file (FILE or FILE:ARG).", flag_values=FLAGS
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Image folder DATA/{train,val}/<class>/; '': the config's.", flag_values=FLAGS
)
_TARGET = flags.DEFINE_float(
    "target",
    None,
    "Test accuracy to reach, in [0, 1]; default: the published figure the config cites "
    "(its `published_accuracy`).",
    flag_values=FLAGS,
)
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs (default: the config's).", flag_values=FLAGS)
_SEED = flags.DEFINE_integer(
    "seed",
    None,
    "config.seed for both runs (default: the config's): the data order, and each framework's "
    "initial weights and augmentation draws.",
    flag_values=FLAGS,
)
_SEEDS = flags.DEFINE_list(
    "seeds",
    [],
    "Seeds to run one after the other, each as --seed=S in a fresh process (--workdir gets a "
    "folder per seed); ends with a line of medians: which framework reaches the target first is "
    "decided by a few test images near the end, so one seed measures speed poorly.",
    flag_values=FLAGS,
)
_FRAMEWORKS = flags.DEFINE_enum(
    "frameworks", "both", ["both", "jax", "torch"], "Which to train.", flag_values=FLAGS
)
_TORCH_COMPILE = flags.DEFINE_enum(
    "torch_compile",
    "auto",
    ["auto", "eager", "compiled"],
    "PyTorch eager, torch.compile, or (auto) whichever a probe projects faster over the run, "
    "compilation included.",
    flag_values=FLAGS,
)
_PEER_INIT = flags.DEFINE_enum(
    "peer_init",
    "own",
    ["own", "vggjax"],
    "The peer's initial weights: its own draws of vggjax's scheme, or vggjax's run's own "
    "(the same seed's variables, copied before its clock starts): a paired comparison.",
    flag_values=FLAGS,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Where vggjax's run goes (a new folder; '': a temporary one).", flag_values=FLAGS
)

PROGRAM = "time_to_accuracy"
_GIVEN = (_CONFIG, _DATA_DIR, _TARGET, _EPOCHS, _FRAMEWORKS, _TORCH_COMPILE, _PEER_INIT)  # --seeds
_BOTH = ("jax", "torch")
_PROBE_STEPS = 8  # timed steps of each variant in the torch.compile probe, after warming up
_PROBE_ROUNDS = 3  # rounds in which the variants take turns at those steps; the median counts
_WARMUP = 3  # first calls, timed apart: torch.compile traces twice (momentum buffers at step 1)

# Config fields that change nothing the two frameworks learn (logging, checkpoints, data
# workers, how the CPU computes, the test protocols run after training), and the values the
# PyTorch peer implements of those that do (None: any). Any other field fails: the peer would
# run another recipe.
_NOT_THE_RECIPE = {
    "data_dir", "num_workers", "checkpoint_every_steps", "max_to_keep", "log_every_steps",
    "profile_steps", "eval_every_steps", "winograd", "eval", "features", "transfer", "loc",
    "init_layers", "num_train_steps", "dataset", "data_in_memory", "data_cache_dir",
    "published_accuracy",
}  # fmt: skip
_PEER_IMPLEMENTS: dict[str, tuple[Any, ...] | None] = {
    **dict.fromkeys(
        ("model", "num_classes", "width", "fc_width", "crop_size", "dropout_rate", "seed"), None
    ),
    "objective": ("classification",),
    "kernel_init": ("normal", "glorot", "he"),
    "dtype": ("float32", "bfloat16"),
    "init_from": ("",),
    "trainable": ("all",),
    **dict.fromkeys(("train_scale", "eval_scale", "mean_rgb", "colour_shift_std"), None),
    **dict.fromkeys(("random_flip", "crop_padding"), None),
    **dict.fromkeys(("batch_size", "num_epochs", "learning_rate", "momentum"), None),
    **dict.fromkeys(("weight_decay", "weight_decay_biases"), None),
    "lr_schedule": ("plateau", "cosine", "linear"),
    "warmup_epochs": None,
    **dict.fromkeys(("lr_drop_factor", "max_lr_drops", "plateau_patience"), None),
}


def check_peer(config: ml_collections.ConfigDict) -> None:
    """UserError naming the first config field whose value the PyTorch peer does not implement."""
    for field, value in config.items():
        if field in _NOT_THE_RECIPE:
            continue
        if field not in _PEER_IMPLEMENTS:
            raise UserError(f"the PyTorch peer does not implement config.{field} ({value!r})")
        allowed = _PEER_IMPLEMENTS[field]
        if allowed is not None and value not in allowed:
            raise UserError(
                f"the PyTorch peer implements config.{field} in {allowed}, not {value!r}"
            )


def load_config() -> tuple[ml_collections.ConfigDict, int]:
    """The flags' config, set to test after every epoch, and its number of training images;
    checked as the command line checks it, and against what the peer implements."""
    from vggjax import main, options
    from vggjax.data import sources

    config = main.load_config(_CONFIG.value)
    if _DATA_DIR.value:
        config.data_dir = _DATA_DIR.value
    if _EPOCHS.value is not None:
        config.num_epochs, config.num_train_steps = _EPOCHS.value, -1
    if _SEED.value is not None:
        config.seed = _SEED.value
    classes = sources.train_classes(config)
    if classes is not None:
        config.num_classes = len(classes)
    options.validate(config)
    check_peer(config)
    if config.num_train_steps > 0:
        raise UserError("the benchmark counts epochs: give --epochs (num_train_steps is set)")
    num_train = len(sources.make_source(config, "train"))
    if num_train < config.batch_size:
        raise UserError("the training set is smaller than one batch")
    # Tested after every epoch, a progress line (and its scalars) at its last step, and no
    # checkpoint before the end.
    config.eval_every_steps = config.log_every_steps = num_train // config.batch_size
    config.checkpoint_every_steps = 10**9
    return config, num_train


def stream_order(seed: int, num_examples: int, steps: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) indices of the training images, in the order vggjax's training reads
    them (`pipeline.train_dataset`, one process): a seeded shuffle, a fresh permutation in each
    epoch of the repeat, global batch t the stream's positions [t B, (t + 1) B), so a batch may
    straddle two epochs."""
    import grain

    stream = grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat()
    return np.array([stream[i] for i in range(steps * batch_size)], np.int64).reshape(steps, -1)


# ---------------------------------------------------------------------------------------------
# vggjax


def read_scalars(logdir: pathlib.Path) -> dict[str, dict[int, tuple[float, float]]]:
    """tag → step → (wall time, value) of the TensorBoard scalars vggjax wrote to `logdir`."""
    from vggjax import metrics

    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    for tag, step, wall_time, value in metrics.scalar_events(logdir):
        scalars.setdefault(tag, {})[step] = (wall_time, value)
    return scalars


def epochs_from_scalars(
    scalars: dict[str, dict[int, tuple[float, float]]], start: float, per_epoch: int, epochs: int
) -> list[dict[str, float]]:
    """Each epoch's training seconds so far (from `start`, validation passes excluded), test
    accuracy and validation seconds, from the progress scalars at its last step (written once
    its steps are computed) and the validation's (written once the pass is done)."""
    out, clock, resumed = [], 0.0, start
    for epoch in range(1, epochs + 1):
        step = epoch * per_epoch
        trained, _ = scalars["train/loss"][step]
        tested, error = scalars["val/top1_error"][step]
        clock += trained - resumed
        out.append(_epoch(epoch, clock, 1.0 - error, tested - trained))
        resumed = tested
    return out


def _epoch(epoch: int, seconds: float, accuracy: float, eval_seconds: float) -> dict[str, float]:
    return dict(
        epoch=epoch,
        seconds=round(seconds, 2),
        accuracy=round(accuracy, 5),
        eval_seconds=round(eval_seconds, 2),
    )


def run_jax(config: ml_collections.ConfigDict, workdir: pathlib.Path, per_epoch: int) -> dict:
    """vggjax's run, as a user's program trains: `train_and_evaluate` in this process."""
    import jax

    from vggjax import train

    if "data_cache_dir" in config:  # decoded in its run, as the peer decodes in its own
        config.data_cache_dir = str(workdir / "arrays")
    start = time.time()  # the wall clock, as TensorBoard's scalars are stamped
    train.train_and_evaluate(config, str(workdir))
    epochs = epochs_from_scalars(
        read_scalars(workdir / "tensorboard"), start, per_epoch, config.num_epochs
    )
    return dict(
        epochs=epochs,
        jax=jax.__version__,
        platform=jax.devices()[0].platform,
        device=jax.devices()[0].device_kind,
        devices=jax.device_count(),
        winograd=config.winograd,  # what the run computed with (train.py records it)
        huge_pages=backend.huge_pages(),
        malloc=backend.malloc(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        compilation_cache=bool(jax.config.jax_compilation_cache_dir),
    )


# ---------------------------------------------------------------------------------------------
# PyTorch: what runs in its own process


def _decoded(source, crop: int | None = None, q: int | None = None) -> tuple[Any, Any]:
    """A source's images, decoded (or, given `crop`, as vggjax's validation crops them: the same
    pixels), NCHW uint8, and labels, as tensors."""
    import torch

    from vggjax.data import augment

    images, labels = [], []
    for i in range(len(source)):
        element = source[i]
        if crop is None:
            image = augment.decode_image(element["data"])
        else:
            image = augment.eval_crop(element["data"], crop=crop, q=q)[0]
        images.append(image)
        labels.append(element["label"])
    if len({image.shape for image in images}) > 1:
        raise UserError("the PyTorch peer holds the images as one tensor: they must be one size")
    images = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
    return images, torch.tensor(labels)


def _init_weights(net, kernel_init: str) -> None:
    """vggjax's initialisation (`models.KERNEL_INITS`, biases zero; BN scale 1, offset 0, as
    PyTorch's) in PyTorch's terms: the fans of (out, in, h, w) and (out, in) are flax's."""
    import math

    import torch

    for module in net.modules():
        if not isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            continue
        w = module.weight
        if kernel_init == "glorot":
            torch.nn.init.xavier_uniform_(w)
        elif kernel_init == "normal":
            torch.nn.init.normal_(w, std=1e-2)
        else:  # flax's he_normal: a normal truncated at 2σ, rescaled to variance 2 / fan_in
            std = math.sqrt(2.0 / w[0].numel()) / 0.87962566103423978
            torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
        torch.nn.init.zeros_(module.bias)


def vggjax_initial(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The variables vggjax's run of `config` starts from (its trainer's init, the same seed)."""
    import jax

    from vggjax import sharding, train

    state = train.Trainer(config, sharding.make_mesh()).init(jax.random.key(config.seed))
    return jax.device_get(dict(params=state.params, batch_stats=state.batch_stats))


def _optimizer(net, config: ml_collections.ConfigDict, device: str, compiled: bool):
    """SGD with momentum, weight decay on what vggjax's `make_optimizer` decays (the kernels; all
    parameters with `weight_decay_biases`). Compiled, the learning rate is a tensor, so the step
    is not compiled again when it changes; eager, a number (a tensor's would be read back from
    the GPU at every step)."""
    import torch

    kernels = {
        id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    params = list(net.parameters())
    decayed = [p for p in params if config.weight_decay_biases or id(p) in kernels]
    rest = [p for p in params if not any(p is q for q in decayed)]
    groups = [dict(params=decayed, weight_decay=config.weight_decay)]
    groups += [dict(params=rest, weight_decay=0.0)] if rest else []
    lr = torch.tensor(config.learning_rate, device=device) if compiled else config.learning_rate
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def _augment(images, config: ml_collections.ConfigDict, generator):
    """vggjax's training crops with tensors, float NCHW: each image rescaled to S ~ U{S_min ..
    S_max} (bilinear), a random crop that may reach `crop_padding` pixels past the edges (zeros
    there), a random flip (`random_flip`), its colour shift minus the mean RGB."""
    import torch
    import torch.nn.functional as F

    from vggjax.data import augment

    n, device, crop = images.shape[0], images.device, config.crop_size
    pad = config.get("crop_padding", 0)
    scales = torch.randint(
        config.train_scale[0], config.train_scale[1] + 1, (n,), generator=generator, device=device
    )
    out, span = torch.empty((n, 3, crop, crop), device=device), torch.arange(crop, device=device)
    for s in scales.unique().tolist():
        chosen = (scales == s).nonzero().squeeze(1)
        x, k = images[chosen].float(), len(chosen)
        size = augment.rescaled_size(tuple(x.shape[2:]), s)
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True).round()
        x = F.pad(x, (pad, pad, pad, pad))
        top, left = (
            torch.randint(0, x.shape[axis] - crop + 1, (k, 1), generator=generator, device=device)
            for axis in (2, 3)
        )
        flip = torch.rand((k, 1), generator=generator, device=device) < 0.5
        flip &= config.get("random_flip", True)
        rows, cols = top + span, left + torch.where(flip, crop - 1 - span, span)
        batch = torch.arange(k, device=device)[:, None, None]
        out[chosen] = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out + _shift(n, config, generator, device)


def _shift(n: int, config: ml_collections.ConfigDict, generator, device: str):
    """Each image's RGB colour shift (`augment.colour_shift`) minus the mean RGB, (n, 3, 1, 1)."""
    import torch

    from vggjax.data import augment

    eigvec = torch.from_numpy(augment.IMAGENET_EIGVEC).to(device)
    eigval = torch.from_numpy(augment.IMAGENET_EIGVAL).to(device)
    alpha = torch.randn((n, 3), generator=generator, device=device) * config.colour_shift_std
    shift = (alpha * eigval) @ eigvec.T * 255.0 - torch.tensor(config.mean_rgb, device=device)
    return shift[:, :, None, None]


class _Peer:
    """The PyTorch net of `config` with its optimizer on `device`: one train step at a time on
    batches of the in-memory images, eager or through `torch.compile` (the net's forward and
    the optimizer's step, as torch_train_step.py compiles them)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        device: str,
        compiled: bool,
        initial: dict[str, Any] | None = None,
    ):
        import functools

        import torch
        import torch_train_step  # benchmarks/: the torchvision-layout VGG of vggjax's table

        from vggjax import models

        model = models.model_from_config(config)
        self.net = torch_train_step.torch_vgg(model).to(device)
        n = models.count_params(models.abstract_variables(model)["params"])
        assert sum(p.numel() for p in self.net.parameters()) == n, "not the same net"
        torch.manual_seed(config.seed)
        if initial is None:
            _init_weights(self.net, config.kernel_init)
        else:
            torch_train_step.load_vggjax(self.net, model, initial)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = _optimizer(self.net, config, device, compiled)
        self.forward, self.optimizer_step = self.net, self.optimizer.step
        if compiled:
            self.forward = torch.compile(self.net)
            self.optimizer_step = torch.compile(self.optimizer.step)
        self.config, self.device = config, device
        self.generator = torch.Generator(device).manual_seed(config.seed)
        self.autocast = functools.partial(
            torch.autocast, device.split(":")[0], torch.bfloat16, enabled=config.dtype != "float32"
        )

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], float):
                group["lr"] = float(lr)
            else:
                group["lr"].fill_(lr)

    def train_step(self, images, labels) -> None:
        import torch
        import torch.nn.functional as F

        x = _augment(images, self.config, self.generator)
        x = x.contiguous(memory_format=torch.channels_last)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.forward(x).float(), labels)
        loss.backward()
        self.optimizer_step()

    def accuracy(self, images, labels) -> float:
        """Top-1 accuracy on validation crops (uint8 NCHW), eager: a compiled forward would
        compile again for inference and the last batch's size, and this is not timed."""
        import torch

        self.net.eval()
        shift = -torch.tensor(self.config.mean_rgb, device=self.device)[None, :, None, None]
        hits = 0
        with torch.inference_mode(), self.autocast():
            for i in range(0, len(images), self.config.batch_size):
                x = (images[i : i + self.config.batch_size].float() + shift).contiguous(
                    memory_format=torch.channels_last
                )
                hits += int((self.net(x).argmax(1) == labels[i : i + len(x)]).sum())
        return hits / len(images)

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def _torch_setup(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """PyTorch at its best here: every core, denormals flushed, its GPU fast paths; the device
    (CUDA when there is one) and the settings."""
    import torch
    import torch_train_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.set_flush_denormal(True)
    settings = torch_train_step.torch_settings(device, config.dtype)
    settings["torch_device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    # OpenMP's waiting: under load from other processes, its default spinning cost this 2-core
    # CPU 17x a step (BENCHMARKS.md, Time to accuracy); OMP_WAIT_POLICY=PASSIVE is the remedy.
    settings["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    return device, settings


def torch_probe(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
    """Each variant's seconds for its first `_WARMUP` steps (compilation) and its median step
    after, on random images, and the variant that finishes `steps` steps first. The variants
    take turns (`_PROBE_ROUNDS` rounds of `_PROBE_STEPS` steps each), so neither is timed alone
    while the process is still warming up or the machine drifts."""
    import torch

    from vggjax.data import sources

    device, _ = _torch_setup(config)
    first = sources.make_source(config, "train")[0]["data"]
    shape = _decoded_shape(first)
    images = torch.randint(0, 256, (config.batch_size, 3, *shape), dtype=torch.uint8)
    images, labels = images.to(device), torch.zeros(config.batch_size, dtype=torch.long).to(device)
    peers = {v: _Peer(config, device, compiled=v == "compiled") for v in ("eager", "compiled")}

    def timed(peer: _Peer, n: int) -> float:
        begin = time.perf_counter()
        for _ in range(n):
            peer.train_step(images, labels)
        peer.sync()
        return time.perf_counter() - begin

    warmup = {v: timed(peer, _WARMUP) for v, peer in peers.items()}
    rounds = [
        {v: timed(peer, _PROBE_STEPS) for v, peer in peers.items()} for _ in range(_PROBE_ROUNDS)
    ]
    result = {}
    for v in peers:
        per_step = statistics.median(r[v] for r in rounds) / _PROBE_STEPS
        result[v] = dict(
            warmup_seconds=round(warmup[v], 2),
            step_ms=round(per_step * 1e3, 2),
            projected_seconds=round(warmup[v] + max(steps - _WARMUP, 0) * per_step, 1),
        )
    result["chosen"] = min(peers, key=lambda v: result[v]["projected_seconds"])
    return result


def _decoded_shape(data: Any) -> tuple[int, int]:
    from vggjax.data import augment

    return augment.decode_image(data).shape[:2]


def learning_rates(config: ml_collections.ConfigDict, total: int, per_epoch: int) -> np.ndarray:
    """SGD's rate at each step before the plateau cuts: vggjax's own (`train.learning_rate`) for a
    fixed budget's schedule (`config.lr_schedule`), else config.learning_rate throughout."""
    if config.get("lr_schedule", "plateau") == "plateau":
        return np.full(total, config.learning_rate)
    from vggjax import train

    return np.asarray(train.learning_rate(config, total, per_epoch)(np.arange(total)))


class _Plateau:
    """vggjax's learning-rate cut (`train.make_plateau`), stepped with each epoch's test error
    when the config's schedule is the paper's; its scale multiplies the rate."""

    def __init__(self, config: ml_collections.ConfigDict):
        import jax.numpy as jnp

        from vggjax import train

        self.on = config.get("lr_schedule", "plateau") == "plateau"
        self.rule = train.make_plateau(config)
        self.state = self.rule.init(jnp.zeros(()))

    def step(self, error: float) -> float:
        import jax.numpy as jnp

        if self.on:
            _, self.state = self.rule.update(
                updates=jnp.zeros(()), state=self.state, value=jnp.float32(error)
            )
        return float(self.state.scale)


def torch_run(
    config: ml_collections.ConfigDict,
    order: np.ndarray,
    per_epoch: int,
    compiled: bool,
    peer_init: str = "own",
) -> dict[str, Any]:
    """The peer's run: its clock from reading the images to each epoch's last step (synced),
    validation apart; from vggjax's initial weights with `peer_init` "vggjax"."""
    import torch

    from vggjax.data import sources

    device, settings = _torch_setup(config)
    # The test crops before the clock starts: vggjax prepares its own in its first validation.
    val = _decoded(sources.make_source(config, "val"), crop=config.crop_size, q=config.eval_scale)
    val = tuple(t.to(device) for t in val)
    initial = vggjax_initial(config) if peer_init == "vggjax" else None
    start = time.time()
    images, labels = (t.to(device) for t in _decoded(sources.make_source(config, "train")))
    load_seconds = time.time() - start
    peer, plateau = _Peer(config, device, compiled, initial), _Plateau(config)
    rates = learning_rates(config, len(order), per_epoch)
    order, scale = torch.from_numpy(order).to(device), 1.0
    epochs, clock, resumed = [], 0.0, start
    for epoch in range(1, config.num_epochs + 1):
        for step in range((epoch - 1) * per_epoch, epoch * per_epoch):
            peer.set_learning_rate(rates[step] * scale)
            peer.train_step(images[order[step]], labels[order[step]])
        peer.sync()
        trained = time.time()
        accuracy = peer.accuracy(*val)
        tested = time.time()
        clock += trained - resumed
        epochs.append(_epoch(epoch, clock, accuracy, tested - trained))
        print(f"{PROGRAM}: PyTorch {epochs[-1]}", file=sys.stderr, flush=True)
        resumed = tested
        scale = plateau.step(1.0 - accuracy)
    return dict(
        epochs=epochs,
        load_seconds=round(load_seconds, 2),
        variant="compiled" if compiled else "eager",
        peer_init=peer_init,
        **settings,
    )


def _serve(conn, fn, args) -> None:
    """The PyTorch process: sends back fn(*args), or the exception it raised."""
    import traceback

    try:
        conn.send(("ok", fn(*args)))
    except Exception as error:
        if not isinstance(error, UserError):
            traceback.print_exc()
        conn.send(("error", error))


def in_own_process(fn, *args) -> Any:
    """fn(*args) in a fresh (spawned) process: PyTorch with this process's malloc (tcmalloc where
    the system has it, which vggjax's programs restart with and which made PyTorch's step 1.3×
    as fast) but without glibc's huge pages (torch_train_step.py measures them for it too), JAX
    there on the CPU (the plateau rule only), and an empty inductor cache, so a compilation is
    as cold as a user's first."""
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = dict(
            GLIBC_TUNABLES=backend.with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""), False),
            JAX_PLATFORMS="cpu",
            TORCHINDUCTOR_CACHE_DIR=cache,
        )
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the spawned interpreter starts with this environment
        try:
            process = context.Process(target=_serve, args=(there, fn, args))
            process.start()
            there.close()  # so that recv ends (EOFError) if the process dies without a word
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        status, value = here.recv()
        process.join()
    if status == "error":
        raise value
    return value


# ---------------------------------------------------------------------------------------------
# Both, and the JSON line


def seconds_to(target: float, epochs: list[dict[str, float]]) -> float | None:
    """Training seconds at the end of the first epoch whose test accuracy reaches `target`."""
    return next((e["seconds"] for e in epochs if e["accuracy"] >= target), None)


def _target(config: ml_collections.ConfigDict) -> float:
    if _TARGET.value is not None:
        return _TARGET.value
    if "published_accuracy" not in config:
        raise UserError(f"{_CONFIG.value} cites no published_accuracy: give --target")
    return config.published_accuracy


def _summary(result: dict[str, Any], target: float) -> dict[str, Any]:
    epochs = result["epochs"]
    return dict(
        seconds_to_target=seconds_to(target, epochs),
        final_accuracy=epochs[-1]["accuracy"],
        train_seconds=epochs[-1]["seconds"],
        **result,
    )


def _host() -> dict[str, Any]:
    info = pathlib.Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [ln for ln in lines if ln.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else ""
    return dict(
        cpus=len(os.sched_getaffinity(0)),
        cpu_count=os.cpu_count(),
        cpu=cpu or platform.processor(),
        python=platform.python_version(),
        load_average_before=_load_average(),
    )


def _load_average() -> list[float]:
    """The host's load averages (1, 5, 15 minutes): the two frameworks run one after the other,
    not taking turns, and the machine may be shared. At a run's end they include its threads."""
    return [round(x, 2) for x in os.getloadavg()]


def _ratio(jax_seconds: float | None, torch_seconds: float | None) -> float | None:
    return round(jax_seconds / torch_seconds, 3) if jax_seconds and torch_seconds else None


def _torch(config: ml_collections.ConfigDict, num_train: int) -> dict[str, Any]:
    """The peer's run in its own process, eager or compiled as --torch_compile says (auto: by a
    probe in a process of its own first)."""
    per_epoch = num_train // config.batch_size
    steps = config.num_epochs * per_epoch
    probe = {}
    compiled = _TORCH_COMPILE.value == "compiled"
    if _TORCH_COMPILE.value == "auto":
        probe = dict(compile_probe=in_own_process(torch_probe, config, steps))
        compiled = probe["compile_probe"]["chosen"] == "compiled"
    order = stream_order(config.seed, num_train, steps, config.batch_size)
    run = in_own_process(torch_run, config, order, per_epoch, compiled, _PEER_INIT.value)
    return run | probe


def _jax(config: ml_collections.ConfigDict, num_train: int) -> dict[str, Any]:
    """vggjax's run in --workdir (a new folder: an old run's checkpoint would resume)."""
    per_epoch = num_train // config.batch_size
    if not _WORKDIR.value:
        with tempfile.TemporaryDirectory(prefix="vggjax-tta-") as workdir:
            return run_jax(config, pathlib.Path(workdir), per_epoch)
    workdir = pathlib.Path(_WORKDIR.value)
    if workdir.exists() and any(workdir.iterdir()):
        raise UserError(f"--workdir {workdir} is not empty: give a new folder")
    return run_jax(config, workdir, per_epoch)


def seed_commands(seeds: list[int]) -> list[list[str]]:
    """This benchmark's command line for each seed: the flags given, --seed=S, and a workdir of
    its own below --workdir (or a temporary one)."""
    given = [h for h in _GIVEN if h.present]
    commands = []
    for seed in seeds:
        command = [sys.executable, os.path.abspath(__file__), *(h.serialize() for h in given)]
        if _WORKDIR.value:
            command.append(f"--workdir={pathlib.Path(_WORKDIR.value) / f'seed_{seed}'}")
        commands.append([*command, f"--seed={seed}"])
    return commands


def _median(values: list[float | None]) -> float | None:
    """The median, None (the target never reached, or no ratio) counting as the largest."""
    middle = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(middle) else round(middle, 3)


def across_seeds(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The line that ends a --seeds run: each seed's two times and ratios, their medians, and in
    how many seeds each framework reached the target first."""
    per_seed = [
        dict(
            seed=line["seed"],
            **{f"{name}_seconds_to_target": line[name]["seconds_to_target"] for name in _BOTH},
            **{f"{name}_train_seconds": line[name]["train_seconds"] for name in _BOTH},
            time_to_target_jax_over_torch=line["time_to_target_jax_over_torch"],
            train_time_jax_over_torch=line["train_time_jax_over_torch"],
        )
        for line in lines
    ]
    median = {
        f"median_{key}": _median([s[key] for s in per_seed]) for key in per_seed[0] if key != "seed"
    }
    first = [(s["jax_seconds_to_target"], s["torch_seconds_to_target"]) for s in per_seed]
    return dict(
        seeds=per_seed,
        **median,
        jax_first=sum(j is not None and (t is None or j < t) for j, t in first),
        torch_first=sum(t is not None and (j is None or t < j) for j, t in first),
    )


def run_seeds(given: list[str]) -> None:
    """Each seed's benchmark in a fresh process, its JSON line passed on as it ends, then the
    line of medians."""
    try:
        seeds = [int(seed) for seed in given]
    except ValueError:
        raise UserError(
            f"--seeds takes integers separated by commas, not {','.join(given)}"
        ) from None
    if _SEED.present:
        raise UserError("give --seed or --seeds, not both")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds names a seed twice: {','.join(given)}")
    if _FRAMEWORKS.value != "both":
        raise UserError("--seeds compares the two frameworks: leave --frameworks at 'both'")
    lines = []
    for command in seed_commands(seeds):
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(done.returncode)  # its error (one line for a user's mistake) is on stderr
        lines.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(lines[-1]), flush=True)
    print(json.dumps(across_seeds(lines)))


def main(argv: list[str]) -> None:
    del argv
    if _SEEDS.value:
        return run_seeds(_SEEDS.value)
    cli.show_own_info()  # vggjax's own progress lines, as `python -m vggjax.main` shows them
    config, num_train = load_config()
    target = _target(config)
    out = dict(
        config=_CONFIG.value,
        model=config.model,
        width=config.width,
        data_dir=config.data_dir,
        train_images=num_train,
        batch_size=config.batch_size,
        epochs=config.num_epochs,
        seed=config.seed,
        steps_per_epoch=num_train // config.batch_size,
        target=target,
        clock="from the run's start (reading data, building the net, compiling) to each "
        "epoch's last step; validation passes excluded (eval_seconds)",
        host=_host(),
    )
    runs = {}
    if _FRAMEWORKS.value != "jax":  # first: vggjax's process has not touched the GPU yet
        runs["torch"] = _torch(config, num_train) | dict(load_average_after=_load_average())
    if _FRAMEWORKS.value != "torch":
        runs["jax"] = _jax(config, num_train) | dict(load_average_after=_load_average())
    out |= {name: _summary(run, target) for name, run in runs.items()}
    if len(runs) == 2:
        out["time_to_target_jax_over_torch"] = _ratio(
            out["jax"]["seconds_to_target"], out["torch"]["seconds_to_target"]
        )
        out["train_time_jax_over_torch"] = _ratio(
            out["jax"]["train_seconds"], out["torch"]["train_seconds"]
        )
    print(json.dumps(out))


if __name__ == "__main__":
    cli.run(PROGRAM, app.run, main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS))
