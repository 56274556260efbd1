"""Training as in Sect. 3.1, data-parallel as in Sect. 3.3.

Multinomial logistic loss (or, for Appendix A's localisation nets, the Euclidean loss of a
box: `config.objective`, vggjax/objectives.py), SGD with momentum 0.9, L2 weight decay 5e-4,
dropout 0.5 on fc6 and fc7, and a learning rate divided by 10 when validation accuracy stops
improving (at most 3 times); or, for a fixed budget (`config.lr_schedule`, small-image recipes),
a linear warm-up then cosine or linear decay to 0. One jitted step over a 1-D device mesh: the batch is split over the `data` axis, the
state is replicated, and XLA averages the gradients across devices, so the update is the one
a single device would compute on the whole batch.
"""

from __future__ import annotations

import concurrent.futures
import functools
import signal
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vggjax import (
    backend,
    checkpoints,
    classes,
    convolution,
    metrics,
    models,
    objectives,
    options,
    sharding,
    storage,
)
from vggjax.data import augment, pipeline, sources
from vggjax.errors import DivergedError, UserError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # BN running averages; empty for the paper's nets
    opt_state: Any
    plateau: Any  # optax reduce_on_plateau state: `scale` multiplies the learning rate
    rng: jax.Array  # raw key data, so checkpoints hold plain arrays


def _base(name: str) -> str:
    return name.removesuffix("_bn")


def learning_rate(
    config: ml_collections.ConfigDict, total_steps: int = 0, steps_per_epoch: int = 0
) -> float | optax.Schedule:
    """SGD's rate by step: config.learning_rate throughout (the paper's, which the plateau cuts
    scale), or config.lr_schedule's over a run of total_steps: linear from 0 over warmup_epochs,
    then cosine or linear decay to 0 at the last step."""
    peak = config.learning_rate
    if config.lr_schedule == "plateau":
        return peak
    warmup = round(config.warmup_epochs * steps_per_epoch)
    decay = max(total_steps - warmup, 1)
    if config.lr_schedule == "cosine":
        decaying = optax.cosine_decay_schedule(peak, decay)
    else:
        decaying = optax.linear_schedule(peak, 0.0, decay)
    if not warmup:
        return decaying
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decaying], [warmup])


def make_optimizer(
    config: ml_collections.ConfigDict, rate: float | optax.Schedule | None = None
) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay (on kernels; on biases too if configured), on the
    layers `config.trainable` names; the others get no update, not even weight decay. `rate`:
    `learning_rate`'s for the run (None: config.learning_rate throughout)."""

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: config.weight_decay_biases or path[-1].key == "kernel", params
        )

    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, decay_mask),
        optax.sgd(config.learning_rate if rate is None else rate, momentum=config.momentum),
    )
    layers = options.TRAINABLE[config.trainable]
    if layers is None:
        return tx
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: {name: "train" if _base(name) in layers else "frozen" for name in params},
    )


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The learning-rate cut, stepped once per validation pass with its watched error (top-1)."""
    return optax.contrib.reduce_on_plateau(
        factor=config.lr_drop_factor,
        patience=config.plateau_patience,
        rtol=0.0,
        atol=1e-3,
        accumulation_size=1,
        min_scale=config.lr_drop_factor**config.max_lr_drops * (1 - 1e-6),
    )


def init_state(
    model: models.VGG,
    tx: optax.GradientTransformation,
    plateau: optax.GradientTransformationExtraArgs,
    rng: jax.Array,
    source: dict[str, Any] | None = None,
    init_layers: str = "net_a",
) -> TrainState:
    """A fresh state: random variables, with layers copied from the variables `source` if given."""
    init_rng, state_rng = jax.random.split(rng)
    variables = models.random_variables(model, init_rng)
    if source is not None:
        variables = initialise_from(variables, source, init_layers)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        plateau=plateau.init(params),
        rng=jax.random.key_data(state_rng),
    )


def initialise_from(
    variables: dict[str, Any], source: dict[str, Any], layers: str
) -> dict[str, Any]:
    """`variables` with the layers `layers` (a key of options.INIT_LAYERS) copied from `source`: their
    parameters, and for BN nets their batch-norm statistics."""
    out = {}
    for collection, tree in variables.items():
        tree, found = dict(tree), source.get(collection, {})
        for name in (n for n in tree if options.INIT_LAYERS[layers](_base(n))):
            if name not in found:
                raise UserError(
                    f"init_from: layer {name} is missing from the checkpoint"
                    + (" (its batch-norm statistics)" if collection != "params" else "")
                )
            shapes = jax.tree.map(jnp.shape, (tree[name], found[name]))
            if shapes[0] != shapes[1]:
                hint = (
                    " (a new number of classes: init_layers='all_but_fc8')" if name == "fc8" else ""
                )
                raise UserError(
                    f"init_from: layer {name} has shape {shapes[1]} in the checkpoint "
                    f"but {shapes[0]} in the model{hint}"
                )
            tree[name] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), found[name])
        out[collection] = tree
    return out


def train_step(
    model: models.VGG,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    trainable: tuple[str, ...] | None = None,
    objective: objectives.Objective = objectives.OBJECTIVES["classification"],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; metrics are sums over the batch's real images.

    objective: the loss and errors of what fc8 learns (class scores or a box).
    trainable: the layers to differentiate (None: all). The others are constants to autodiff,
    so no backward pass runs below the lowest trainable layer.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mask = batch["mask"]
    # Masked images enter no batch statistic; a batch with none to count (all undecodable)
    # counts them all rather than divide by zero: its loss is zero either way.
    counted = jnp.where(jnp.any(mask > 0), mask, 1.0)

    def loss_fn(params):
        if trainable is not None:
            params = {
                name: p if _base(name) in trainable else jax.lax.stop_gradient(p)
                for name, p in params.items()
            }
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            augment.net_input(batch),  # uint8 crops + colour shift - mean, here on the device
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
            mask=counted,
        )
        logits = logits.astype(jnp.float32)
        losses = objective.loss(logits, batch)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    steps, opt_state = tx.update(grads, state.opt_state, state.params)
    steps = jax.tree.map(lambda s: s * state.plateau.scale, steps)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, steps),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    metrics = dict(
        loss=loss * jnp.sum(mask),
        **error_counts(objective, logits, batch),
        skipped=jnp.sum(1.0 - mask),
        nonfinite=1.0 - finite.astype(jnp.float32),
    )
    return new_state, metrics


def error_counts(
    objective: objectives.Objective, outputs: jax.Array, batch: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """The objective's errors (top-1 and top-5, or the box's) summed over the real (mask 1)
    images as `<name>s`, and their count."""
    mask = batch["mask"]
    errors = objective.errors(outputs, batch)
    return {f"{name}s": jnp.sum(e * mask) for name, e in errors.items()} | {"count": jnp.sum(mask)}


def eval_step(
    model: models.VGG,
    objective: objectives.Objective,
    state: TrainState,
    batch: dict[str, jax.Array],
) -> dict[str, jax.Array]:
    """Validation errors on centre crops (the pass that drives the learning-rate cut)."""
    outputs = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        augment.net_input(batch),
        train=False,
    )
    return error_counts(objective, outputs.astype(jnp.float32), batch)


def _check_input_convention(config: ml_collections.ConfigDict, path: str) -> None:
    """Warns when the run subtracts another mean RGB than the checkpoint's net was trained with."""
    try:
        mean = checkpoints.read_config(path)["mean_rgb"]
    except UserError:  # no config.json: nothing recorded to compare with
        return
    if not np.allclose(mean, config.mean_rgb, atol=1e-3):
        logging.warning(
            "config.mean_rgb is %s but %s was trained with mean_rgb %s: its layers "
            "see shifted inputs (model '' takes the checkpoint's net and mean).",
            tuple(config.mean_rgb),
            path,
            tuple(mean),
        )


class Trainer:
    """The jitted steps of one model on one mesh, and the sharding of their inputs: what a
    training loop of your own needs (`train_and_evaluate` is the paper's).

    Args:
      config: the net, objective, optimizer, trainable layers and `init_from`.
      mesh: the devices; batches are split over its `data` axis, the state replicated.
      total_steps, steps_per_epoch: the run's length, over which `config.lr_schedule` runs.

    Attributes:
      train_step: (state, global batch) → (state, summed metrics); the old state is donated.
      eval_step: (state, global batch) → summed error counts.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        total_steps: int = 0,
        steps_per_epoch: int = 0,
    ):
        self.config, self.mesh = config, mesh
        self.learning_rate = learning_rate(config, total_steps, steps_per_epoch)
        # With the conv layers frozen, their batch norms keep their statistics too.
        self.model = models.model_from_config(config).clone(
            batch_norm_frozen=options.TRAINABLE[config.trainable] is not None
        )
        self.objective = objectives.OBJECTIVES[config.objective]
        self.tx = make_optimizer(config, self.learning_rate)
        self.plateau = make_plateau(config)
        self.replicated = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.train_step = jax.jit(
            functools.partial(
                train_step,
                self.model,
                self.tx,
                trainable=options.TRAINABLE[config.trainable],
                objective=self.objective,
            ),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            functools.partial(eval_step, self.model, self.objective),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )
        self.plateau_step = jax.jit(
            lambda plateau, params, error: self.plateau.update(
                updates=params, state=plateau, value=error
            )[1]
        )

    def init(self, rng: jax.Array) -> TrainState:
        """A fresh train state, replicated over the mesh.

        Args:
          rng: the key of the random initialisation.

        Returns:
          The state: variables initialised at random, with the layers `config.init_layers`
          names copied from `config.init_from` when it names a checkpoint.
        """
        source = None
        if self.config.init_from:
            source = checkpoints.restore_params(self.config.init_from, self.replicated)
            _check_input_convention(self.config, self.config.init_from)
            logging.info(
                "Initialising layers (%s) from %s; training %s layers.",
                self.config.init_layers,
                self.config.init_from,
                self.config.trainable,
            )
        init = functools.partial(
            init_state, self.model, self.tx, self.plateau, init_layers=self.config.init_layers
        )
        compiler_options = backend.init_compiler_options()
        return jax.jit(init, out_shardings=self.replicated, compiler_options=compiler_options)(
            rng, source
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto."""
        shapes = jax.eval_shape(
            functools.partial(init_state, self.model, self.tx, self.plateau), jax.random.key(0)
        )
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes
        )

    def compile_ahead(self) -> concurrent.futures.Future:
        """Compiles `train_step` for the config's batches in a thread of its own, where jit's
        calls then find it: a run's compiling overlaps its reading of the data. The future's
        `result()` raises what compiling raised."""
        batch = {
            k: jax.ShapeDtypeStruct(
                (self.config.batch_size, *v.shape), v.dtype, sharding=self.batch_sharding
            )
            for k, v in pipeline.blank_example(self.config).items()
        }
        executor = concurrent.futures.ThreadPoolExecutor(1, "compile_ahead")
        future = executor.submit(
            lambda: self.train_step.lower(self.abstract_state(), batch).compile()
        )
        executor.shutdown(wait=False)  # the thread ends with its one task
        return future

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global batch from each process's own slice of it (the input pipeline's), as
        `train_step` and `eval_step` take it: sharded on `data`, nothing copied between hosts."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()
        }

    def evaluate(self, state: TrainState, dataset) -> dict[str, float]:
        """The validation pass: the objective's errors over one pass of `dataset`.

        Args:
          state: the train state to evaluate.
          dataset: per-process batches with masks (`pipeline.eval_dataset`): padding is masked,
            nothing is dropped. Its worker processes are stopped at the end.

        Returns:
          Each error as a rate (`top1_error`, `top5_error`, or the box's), and `count`.
        """
        totals, batches = None, iter(dataset)
        try:
            for local in batches:
                counts = self.eval_step(state, self.global_batch(local))
                totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
        finally:
            pipeline.close(batches)  # stops its worker processes now, not at exit
        totals = jax.device_get(totals)
        n = max(float(totals["count"]), 1.0)
        errors = {k[:-1]: float(v) / n for k, v in totals.items() if k.endswith("_errors")}
        return errors | {"count": int(totals["count"])}


class _Preemption:
    """SIGTERM (a preempted TPU VM or cluster job) asks the loop to checkpoint and stop.

    With several processes, jax.distributed's own SIGTERM notifier picks one step at which all of
    them stop, whichever got the signal, and when: a Python handler would replace it (and leave
    the others in the next step's collectives), so there is none then.
    """

    def __init__(self):
        self.requested = False
        self._handling = jax.process_count() == 1
        if self._handling:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the current step, then exiting.")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._handling:
            return self.requested
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def restore(self) -> None:
        if self._handling:
            signal.signal(signal.SIGTERM, self._previous)


def _steps(config: ml_collections.ConfigDict, train_source: sources.Source) -> tuple[int, int]:
    """(total steps, steps per epoch) of the run, checking the training set (listed or decoded)
    fits the config."""
    if train_source.num_classes != config.num_classes:
        raise UserError(
            f"config.num_classes is {config.num_classes} but the {config.dataset} "
            f"training set has {train_source.num_classes} classes"
        )
    per_epoch = len(train_source) // config.batch_size
    if per_epoch == 0:
        raise UserError(
            f"the training set has {len(train_source)} images, fewer than one batch "
            f"of config.batch_size={config.batch_size}"
        )
    total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * per_epoch
    return total, per_epoch


class _Run:
    """One training run's loop state: the train state, where the data and the checkpoints are,
    and the step metrics not yet reported. Each method moves it on explicitly."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.process = dict(process_index=jax.process_index(), process_count=jax.process_count())
        listed = pipeline.listed(config, "train")
        self.total_steps, per_epoch = _steps(config, listed)
        self.trainer = trainer = Trainer(config, sharding.make_mesh(), self.total_steps, per_epoch)
        compiling = trainer.compile_ahead()  # while the images are decoded (data_in_memory)
        train_source = pipeline.source(config, "train", listed)
        self.data = iter(pipeline.train_dataset(config, **self.process, images=train_source))
        self.ckpt = checkpoints.Checkpoints(workdir, config.max_to_keep)
        config.winograd = convolution.in_effect(
            trainer.model.winograd
        )  # what this run computes with
        if jax.process_index() == 0:  # what the checkpoints are: for evaluation and fine-tuning
            storage.write_json(
                storage.at(workdir) / checkpoints.CONFIG_FILE,
                classes.run_record(config, train_source.class_names),
            )
        if self.ckpt.latest_step() is not None:
            self.state = self.ckpt.restore(trainer.abstract_state(), self.data)
            logging.info("Resumed from the checkpoint at step %d.", int(self.state.step))
        else:
            self.state = trainer.init(jax.random.key(config.seed))
        self.step = int(self.state.step)
        self.pending: list[dict[str, jax.Array]] = []  # step metrics since the last report
        self.skipped = 0.0  # undecodable training images so far
        self.reporter = metrics.Reporter(workdir, self.total_steps, config.batch_size, self.step)
        logging.info(
            "Training %s on %d devices (%d processes): %d steps of %d images, %d per epoch.",
            config.model,
            trainer.mesh.size,
            jax.process_count(),
            self.total_steps,
            config.batch_size,
            per_epoch,
        )
        self.profiler = metrics.Profiler(workdir, config.profile_steps, self.step)
        compiling.result()

    def train_step(self) -> None:
        with jax.profiler.StepTraceAnnotation("train", step_num=self.step + 1):
            batch = self.trainer.global_batch(next(self.data))
            self.state, step_metrics = self.trainer.train_step(self.state, batch)
        self.step += 1
        self.pending.append(step_metrics)
        self.profiler.after(self.step, self.state)

    def report(self) -> None:
        """The progress line of the steps since the last one; stops a diverged run."""
        sums = self._checked_sums()
        self.pending = []
        self.skipped += sums["skipped"]
        rate = self.trainer.learning_rate
        rate = rate(self.step - 1) if callable(rate) else rate  # the last step's
        lr = float(rate) * float(self.state.plateau.scale)
        self.reporter.train(self.step, sums, lr)

    def _checked_sums(self) -> dict[str, float]:
        host = jax.device_get(self.pending)
        sums = {k: float(sum(m[k] for m in host)) for k in host[0]} if host else {}
        if sums.get("nonfinite"):
            self.ckpt.close()
            raise DivergedError(
                f"the loss or gradients became NaN/Inf before step {self.step}; stopped without "
                f"saving. The last good checkpoint (step {self.ckpt.latest_step()}) is kept in "
                f"{self.workdir}."
            )
        return sums

    def validate(self) -> dict[str, float]:
        result = self.trainer.evaluate(
            self.state, pipeline.eval_dataset(self.config, **self.process)
        )
        self.reporter.eval(self.step, "val", result)
        return result

    def cut_learning_rate(self, error: float) -> None:
        """Steps the plateau schedule with a validation pass's watched error (top-1); a fixed
        budget's schedule (`config.lr_schedule`) is not cut."""
        if self.config.lr_schedule != "plateau":
            return
        plateau = self.trainer.plateau_step(
            self.state.plateau, self.state.params, jnp.float32(error)
        )
        self.state = self.state.replace(plateau=plateau)

    def save(self, force: bool = False) -> None:
        """Checkpoints this step (once), after checking its metrics are finite."""
        self._checked_sums()
        if self.ckpt.latest_step() != self.step:
            self.ckpt.save(self.step, self.state, self.data, force=force)
            logging.info("Saving the checkpoint of step %d in %s.", self.step, self.workdir)

    def close(self) -> None:
        pipeline.close(self.data)
        self.reporter.close()
        self.profiler.close()


def _loop(run: _Run, preemption: _Preemption) -> bool:
    """Trains to the end; False if stopped early by SIGTERM (after saving)."""
    c = run.config
    while run.step < run.total_steps:
        run.train_step()
        if run.step % c.log_every_steps == 0 or run.step == run.total_steps:
            run.report()
        if run.step % c.eval_every_steps == 0 and run.step < run.total_steps:
            run.cut_learning_rate(run.validate()[run.trainer.objective.watch])
        if preemption.reached(run.step):
            run.save(force=True)
            return False
        if run.step % c.checkpoint_every_steps == 0:
            run.save()
    run.save(force=True)
    return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains as in Sect. 3.1 on all devices of all processes: the command line's `--mode=train`.

    Rerun with the same arguments, it resumes from the workdir's latest checkpoint (after a
    crash or a SIGTERM, which saves one first).

    Args:
      config: the whole run (recipe.py's fields).
      workdir: local folder or gs:// path for checkpoints, config.json, TensorBoard events and
        results.json.

    Returns:
      What results.json holds: the final validation errors at `eval_scale` and the step; or
      `{"step": ..., "preempted": True}` when a SIGTERM stopped the run.

    Raises:
      DivergedError: the loss or gradients became NaN or Inf (the last good checkpoint is kept).
      UserError: a training set whose classes are not `config.num_classes` or smaller than a
        batch, an `init_from` checkpoint missing a layer to copy or of another shape, or a
        localisation objective without `init_from` (A.1 starts from a classifier).
    """
    options.check_start(config)
    run = _Run(config, workdir)
    preemption = _Preemption()
    try:
        finished = _loop(run, preemption)
        result = run.validate() if finished else None
    finally:
        run.close()
        preemption.restore()
    run.ckpt.close()
    if not finished:
        logging.warning(
            "Stopped at step %d on SIGTERM; rerun the same command to resume.", run.step
        )
        return {"step": run.step, "preempted": True}
    results = {
        "model": config.model,
        "dataset": config.dataset,
        "step": run.step,
        "eval_scale": config.eval_scale,
        "crop_size": config.crop_size,
        **{k: v for k, v in result.items() if k.endswith("_error")},
        "val_images": result["count"],
        "train_images_skipped": int(run.skipped),
    }
    if jax.process_index() == 0:
        storage.write_json(storage.at(workdir) / "results.json", results)
    return results
