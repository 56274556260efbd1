"""Command line: `python -m vggjax.main --config=configs/vgg19.py --workdir=DIR [--mode=MODE]`.

Any field of the config can be set with `--config.FIELD=VALUE`. A user mistake (a bad flag,
config field or value) ends with one line on stderr and exit status 2 (`vggjax.cli`); any other
exception is a bug and keeps its traceback.

Thin on purpose: flags in (`parse_flags`: the config file runs once, ml_collections' config_flags
applies the overrides), `--mode`'s function of vggjax out (`_run_mode`).
"""

from __future__ import annotations

import importlib.util
import os
import re

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vggjax import cli
from vggjax.errors import UserError

FLAGS = flags.FlagValues()  # main's own, not absl's global registry (cli.parse_flags)
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "Configuration file, e.g. configs/vgg16.py or configs/vgg16.py:256-512; "
    "override fields with --config.FIELD=VALUE.",
    flag_values=FLAGS,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and results.", flag_values=FLAGS
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "summary", "features", "transfer"],
    "train: train (resuming from the workdir); eval: the paper's test "
    "protocols (Appendix A's for a localisation net); summary: print the layer table; features: Appendix B's "
    "descriptors of the data set; transfer: linear SVMs on them, scored.",
    flag_values=FLAGS,
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "--mode=summary: count for this image size (dense form) instead of the crop.",
    flag_values=FLAGS,
)

# Multi-host runs: the same command on every host. On a TPU pod and under SLURM or Open MPI, JAX
# finds all three values itself; elsewhere (or to override) give them on every process.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: HOST:PORT of process 0, the same on every process.",
    flag_values=FLAGS,
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    None,
    "Multi-host: how many processes run this command.",
    lower_bound=1,
    flag_values=FLAGS,
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "Multi-host: this process's index, 0 to num_processes - 1.",
    lower_bound=0,
    flag_values=FLAGS,
)
flags.register_multi_flags_validator(
    ["process_id", "num_processes"],
    lambda f: None in (f["process_id"], f["num_processes"]) or f["process_id"] < f["num_processes"],
    "--process_id must be less than --num_processes",
    flag_values=FLAGS,
)


def _init_distributed() -> None:
    """Joins the other processes of a multi-host run, before JAX touches a device.

    A lone process (no flags, no cluster detected) skips it: JAX raises ValueError when it can
    find no coordinator.
    """
    import jax

    given = {
        name: flag.value
        for name, flag in (
            ("coordinator_address", _COORDINATOR),
            ("num_processes", _NUM_PROCESSES),
            ("process_id", _PROCESS_ID),
        )
        if flag.value is not None
    }
    try:
        jax.distributed.initialize(**given)
    except ValueError as e:
        if given:
            raise UserError(
                f"jax.distributed: {e} Outside a TPU pod, SLURM or Open MPI job, give "
                f"--coordinator_address, --num_processes and --process_id"
            ) from e
        return
    logging.info(
        "Process %d of %d; %d devices in all.",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


def _summary(config: ml_collections.ConfigDict) -> None:
    from vggjax import models, summary

    model = models.model_from_config(config)
    image_size = _IMAGE_SIZE.value
    if image_size is not None and image_size < config.crop_size:
        raise UserError(
            f"--image_size must be at least the crop ({config.crop_size}), got {image_size}"
        )
    print(f"Config ({_CONFIG.value}):")
    print(config)
    print(summary.format_summary(model, config.model, image_size))


def _use_compilation_cache() -> None:
    """Restarts and resumed runs skip XLA compilation (and GPU autotuning)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.environ.get("VGGJAX_CACHE") or os.path.expanduser("~/.cache/vggjax")
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "jax"))
    # Beside the programs, XLA's per-fusion GPU autotuning results (JAX's default, pinned here):
    # a program missing from the cache still skips tuning any fusion of the same shapes that an
    # earlier run tuned.
    if not os.environ.get("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES"):
        jax.config.update(
            "jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir"
        )


def _classes_from_data(config: ml_collections.ConfigDict, overridden: frozenset[str]) -> None:
    """A folder's or a TFDS data set's number of classes is its training set's, unless the
    command line gives --config.num_classes (training then checks that they agree): a config
    file's value (configs/demo.py's 10, fine-tuning's None) is not the user's data."""
    if "num_classes" in overridden:
        return
    from vggjax.data import sources

    classes = sources.train_classes(config)
    if classes is not None:
        config.num_classes = len(classes)


def _run_mode(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
    if mode == "train":
        from vggjax.train import train_and_evaluate

        train_and_evaluate(config, workdir)
    else:
        from vggjax import evaluators

        evaluators.get(evaluators.for_mode(mode, config))(config, workdir)


def _main(parsed: tuple[ml_collections.ConfigDict, frozenset[str]]) -> None:
    """`--mode`'s function of the config, once it is complete and checked."""
    config, overridden = parsed
    from vggjax import options, pretrained, storage  # after flag parsing: keeps --help fast

    config = pretrained.inherit_net(config)
    if _MODE.value != "summary":
        _classes_from_data(config, overridden)
    options.validate(config)
    if _MODE.value == "summary":
        return _summary(config)
    if not _WORKDIR.value:
        raise UserError(f"--workdir is required for --mode={_MODE.value}")
    storage.at(_WORKDIR.value)  # gs:// without the gcs extra: said now, not after the setup
    _use_compilation_cache()
    _init_distributed()
    _run_mode(_MODE.value, config, _WORKDIR.value)


def load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config(ARG)` of a config file, `path` being `FILE` or `FILE:ARG`."""
    file, *arg = path.split(":", 1)
    if not os.path.isfile(file):
        raise UserError(f"config file {file!r} not found; the configs are in configs/")
    spec = importlib.util.spec_from_file_location("_vggjax_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*arg)


def _has_field(config: ml_collections.ConfigDict, field: str) -> bool:
    """Whether `field` ("eval.scales") names a field of `config`."""
    *parents, name = field.split(".")
    for parent in parents:
        config = config.get(parent) if isinstance(config, ml_collections.ConfigDict) else None
    if not isinstance(config, ml_collections.ConfigDict):
        return False
    return name in config


_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.([^=]+)")  # --config.FIELD=VALUE, --noconfig.FLAG


def parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, frozenset[str]]:
    """main's flags; then the config file, executed once, with the `--config.FIELD` overrides
    applied by ml_collections' config_flags (after checking each names a field: config_flags
    raises a bare AttributeError for an unknown one). Returns the config and the fields set."""
    rest = cli.parse_flags(argv, FLAGS, known_only=True)
    if not _CONFIG.value:
        raise UserError("--config is required, e.g. --config=configs/vgg16.py")
    config = load_config(_CONFIG.value)
    for field in (m[1] for m in map(_OVERRIDE.match, rest[1:]) if m):
        if not _has_field(config, field):
            raise UserError(
                f"unknown config field --config.{field}; --mode=summary lists the fields of "
                f"{_CONFIG.value}"
            )
    fields = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=fields, sys_argv=rest)
    cli.parse_flags(rest, fields)
    return config, frozenset(fields["config"].override_values)


def run() -> None:
    """`python -m vggjax.main` and the `vggjax` console script."""
    cli.show_own_info()
    cli.run("vggjax", app.run, _main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
