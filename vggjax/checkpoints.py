"""Orbax checkpoints: a killed run resumes where it was; downstream work loads the parameters.

A workdir holds `checkpoints/<step>/` with two items: `state` (parameters, optimizer and
learning-rate state, random key, step) and `data` (each process's grain iterator position).
Orbax writes a step into a temporary folder and renames it when complete (on Cloud Storage,
which cannot rename, it marks the step complete with a last file instead), so a checkpoint
half-written when the process died is never listed, and so never loaded. The workdir may be a
local folder or a `gs://` URI (vggjax/storage.py).
"""

from __future__ import annotations

import contextlib
import logging as pylogging
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vggjax import storage
from vggjax.errors import UserError

STATE, DATA = "state", "data"
# Beside checkpoints/, what the net is and what input it takes: training writes its whole config,
# vggjax.convert the model fields and mean RGB of the weights it converted.
CONFIG_FILE = "config.json"


def workdir_of(path: str) -> str:
    """The workdir of what restore_params accepts: a workdir, its checkpoints/ or a step folder."""
    where = storage.at(path)
    if (where / STATE).is_dir():  # WORKDIR/checkpoints/STEP
        where = where.parent.parent
    elif where.name == "checkpoints":
        where = where.parent
    return str(where)


def read_config(path: str) -> dict[str, Any]:
    """The workdir's config.json: what the net is and what input it takes.

    Args:
      path: a workdir, its checkpoints/ folder or one step's folder (`workdir_of`).

    Returns:
      The JSON object: training's whole config, or `vggjax.convert`'s model fields, mean RGB and
      `pretrained` record.

    Raises:
      UserError: no config.json, not valid JSON, or one without `model` or `mean_rgb`.
    """
    file = storage.at(workdir_of(path)) / CONFIG_FILE
    config = storage.read_json(
        file,
        missing=f"no {CONFIG_FILE} in {workdir_of(path)}: it tells the model and its "
        f"input mean (vggjax.convert and training write it)",
    )
    missing = [k for k in ("model", "mean_rgb") if k not in config]
    if missing:
        raise UserError(f"{file} has no {' or '.join(missing)}")
    return config


def _checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    return storage.at(workdir) / "checkpoints"


class Checkpoints:
    """Saves and restores the training state and the data iterator of one workdir.

    Args:
      workdir: a local folder or gs:// path; the checkpoints go to its checkpoints/.
      max_to_keep: the newest steps kept; older ones are deleted as new ones complete.
    """

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.manager = ocp.CheckpointManager(
            _checkpoint_dir(workdir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None: none yet, a fresh run)."""
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iterator: grain.DatasetIterator, force: bool = False
    ) -> None:
        """Starts an asynchronous save; training goes on while it is written."""
        self.manager.save(
            step,
            force=force,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(data_iterator),
                }
            ),
        )

    def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
        """The latest state, laid out as `abstract_state` (ShapeDtypeStructs with shardings);
        `data_iterator` is moved to the saved position in place."""
        restored = self.manager.restore(
            self.latest_step(),
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                }
            ),
        )
        return restored[STATE]

    def close(self) -> None:
        """Waits for pending saves to finish."""
        self.manager.wait_until_finished()
        self.manager.close()


class _ErrorsOnly(pylogging.Filter):
    """Lets through errors only, or everything when debugging (--verbosity=1)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.ERROR or logging.get_verbosity() >= logging.DEBUG


@contextlib.contextmanager
def quiet_reading() -> Iterator[None]:
    """Orbax warns on every read-only restore (`read_only=True, setting save_interval_steps=0`,
    `Metadata file does not exist`, ...), and fsspec announces its read cache at each file opened
    in a bucket: nothing wrong and nothing to do, so not shown."""
    quiet = _ErrorsOnly()
    loggers = [pylogging.getLogger(name) for name in ("absl", "fsspec.caching")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _state_item_dir(path: str) -> epath.Path:
    """The `state` item of: a workdir, its checkpoints/ folder, or one step's folder."""
    path = storage.at(path)
    if (path / STATE).is_dir():
        return path / STATE
    root = _checkpoint_dir(path) if _checkpoint_dir(path).is_dir() else path
    if not root.is_dir():
        raise ValueError(
            f"no checkpoint at {path}: expected a workdir, its checkpoints/ folder "
            f"or one step's folder"
        )
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        step = m.latest_step()
    if step is None:
        raise ValueError(f"no complete checkpoint in {root}")
    return root / str(step) / STATE


def restore_params(path: str, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
    """The model variables of a checkpoint, without the optimizer or data state.

    Args:
      path: a workdir (its latest checkpoint), its checkpoints/ folder, or one step's folder;
        local or gs://.
      sharding: where the arrays land (default: the first local device), whatever the device
        count of the run that wrote them.

    Returns:
      {"params": ...} (and "batch_stats" for BN nets), as `model.apply` takes them.

    Raises:
      ValueError: no complete checkpoint there, or one holding no model parameters.
    """
    with quiet_reading():
        return _restore_params(path, sharding)


def _restore_params(path: str, sharding: jax.sharding.Sharding | None) -> dict[str, Any]:
    item_dir = _state_item_dir(path)
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item_dir).item_metadata.tree
    item = {k: tree[k] for k in ("params", "batch_stats") if tree.get(k)}
    if "params" not in item:
        raise ValueError(f"{item_dir} holds no model parameters")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), item
    )
    return checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        ),
    )


def save_params(workdir: str, variables: dict[str, Any]) -> None:
    """Writes weights trained elsewhere as a checkpoint that `restore_params` and `init_from`
    read (`vggjax.convert` uses it; config.json is the caller's to write).

    Args:
      workdir: a new folder or gs:// path; the variables become its only checkpoint, step 0,
        with no optimizer or data state.
      variables: {"params": ...} (and "batch_stats" for BN nets).

    Raises:
      ValueError: the workdir already holds checkpoints.
    """
    root = _checkpoint_dir(workdir)
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        if manager.latest_step() is not None:
            raise ValueError(f"{root} already holds checkpoints; choose a new directory")
        manager.save(0, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(variables)}))
