"""Command line: `python -m vggjax.main --config=configs/vgg19.py --workdir=DIR [--mode=MODE]`.

Thin on purpose: flags in, one function of vggjax out. A user mistake (a bad flag, config
field or value) ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Configuration file, e.g. configs/vgg16.py or configs/vgg16.py:256-512; "
    "override fields with --config.FIELD=VALUE.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "summary", "features", "transfer"],
    "train: train (resuming from the workdir); eval: the paper's test "
    "protocols; summary: print the layer table; features: Appendix B's "
    "descriptors of the data set; transfer: linear SVMs on them, scored.",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "--mode=summary: count for this image size (dense form) instead of the crop.",
)

# Multi-host runs: the same command on every host. On a TPU pod and under SLURM or Open MPI, JAX
# finds all three values itself; elsewhere (or to override) give them on every process.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0, the same on every process."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: how many processes run this command.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's index, 0 to num_processes - 1.", lower_bound=0
)
flags.register_multi_flags_validator(
    ["process_id", "num_processes"],
    lambda f: None in (f["process_id"], f["num_processes"]) or f["process_id"] < f["num_processes"],
    "--process_id must be less than --num_processes",
)


def _fail(message: str) -> None:
    print(f"vggjax: error: {message}", file=sys.stderr)
    sys.exit(2)


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
            raise ValueError(
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


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; all options are --flags")
    mode = _MODE.value
    from vggjax import pretrained, recipe  # after flag parsing: keeps --help fast

    try:
        config = pretrained.inherit_net(_CONFIG.value)
        recipe.validate(config)
        if mode == "summary":
            from vggjax import models, summary

            model = models.create_model(
                config.model,
                config.num_classes,
                width=config.width,
                fc_width=config.fc_width,
                crop_size=config.crop_size,
            )
            if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value < config.crop_size:
                raise ValueError(
                    f"--image_size must be at least the crop ({config.crop_size}), "
                    f"got {_IMAGE_SIZE.value}"
                )
            print(f"Config ({config_flags.get_config_filename(flags.FLAGS['config'])}):")
            print(config)
            print(summary.format_summary(model, config.model, _IMAGE_SIZE.value))
            return
        if not _WORKDIR.value:
            raise ValueError(f"--workdir is required for --mode={mode}")
        import jax

        # Restarts and resumed runs skip XLA compilation (and GPU autotuning).
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            jax.config.update(
                "jax_compilation_cache_dir",
                os.path.join(
                    os.environ.get("VGGJAX_CACHE") or os.path.expanduser("~/.cache/vggjax"), "jax"
                ),
            )
        _init_distributed()
        if mode == "eval":
            from vggjax import evaluate

            evaluate.evaluate(config, _WORKDIR.value)
        elif mode == "features":
            from vggjax import features

            features.run(config, _WORKDIR.value)
        elif mode == "transfer":
            from vggjax import transfer

            transfer.run(config, _WORKDIR.value)
        else:
            from vggjax import train

            train.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, FloatingPointError) as e:  # bad input, or a diverged run: say which
        _fail(str(e))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with one line for a bad flag instead of a usage dump or a traceback."""
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if "--config" in argv[:-1]:
        config_path = argv[argv.index("--config") + 1]
    if config_path is None:
        _fail("--config is required, e.g. --config=configs/vgg16.py")
    if not os.path.isfile(config_path.split(":", 1)[0]):
        _fail(
            f"config file {config_path.split(':', 1)[0]!r} not found; the configs are in configs/"
        )
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # the config's own error is the last line of the message
        lines = [line for line in str(e).splitlines() if line.strip()]
        flag = lines[0].split(": ", 1)[0]
        _fail(f"{flag}: {lines[-1].split(': ', 1)[-1]}" if len(lines) > 1 else lines[0])
    except (AttributeError, KeyError) as e:  # config_flags' way of saying "no such field"
        name = str(e).strip("'\"")
        field = next(
            (a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a), name
        )
        _fail(f"unknown config field {field}; --mode=summary lists the fields of {config_path}")


class _OwnInfoOnly(pylogging.Filter):
    """INFO lines from vggjax only: orbax and jax narrate every save and backend probe."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "vggjax" in record.pathname


def run() -> None:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
