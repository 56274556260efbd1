"""What a user watches: a progress line on the console and TensorBoard scalars in the workdir,
and on request a profiler trace of some train steps.

Only process 0 writes, so a pod prints and logs each figure once.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging

from vggjax import storage


def scalar_events(folder: Any) -> Iterator[tuple[str, int, float, float]]:
    """(tag, step, wall time, value) of each scalar in the TensorBoard event files of `folder`
    (a path, local or `storage.at`'s; none if it does not exist), in the order written: TFRecord
    framing (length, its CRC, the Event, its CRC) read with tensorboardX's protos, without
    TensorFlow."""
    from tensorboardX.proto import event_pb2

    for file in sorted(folder.glob("events.out.tfevents.*")) if folder.exists() else ():
        data, offset = file.read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                yield value.tag, event.step, event.wall_time, value.simple_value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _label(error: str) -> str:
    """A progress line's name for an error: top1_error → "top-1 err", loc_error → "loc err"."""
    return error.removesuffix("_error").replace("top", "top-") + " err"


class Reporter:
    """Turns summed step metrics into error rates, images/s and time left. The errors are the
    objective's (`<name>_errors` sums): top-1 and top-5, or a box's."""

    def __init__(self, workdir: str, total_steps: int, batch_size: int, start_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self.last_step, self.last_time = start_step, time.monotonic()
        self.writer = None
        if jax.process_index() == 0:
            import tensorboardX  # event files without TensorFlow

            # Cloud Storage: tensorboardX's own writer (google-cloud-storage) uploads the
            # whole event file again at each flush, so TensorBoard follows the run as it goes.
            self.writer = tensorboardX.SummaryWriter(str(storage.at(workdir) / "tensorboard"))

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def train(self, step: int, sums: dict[str, float], learning_rate: float) -> None:
        now = time.monotonic()
        rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        n = max(sums["count"], 1.0)
        errors = {k[:-1]: v / n for k, v in sums.items() if k.endswith("_errors")}
        scalars = {
            "train/loss": sums["loss"] / n,
            **{f"train/{k}": v for k, v in errors.items()},
            "train/learning_rate": learning_rate,
            "train/images_per_sec": rate,
        }
        self._write(step, scalars)
        if jax.process_index() == 0:
            logging.info(
                "step %d/%d (%.0f%%) | loss %.4f | %s | lr %.1e | %.0f img/s | %s left%s",
                step,
                self.total_steps,
                100 * step / self.total_steps,
                scalars["train/loss"],
                " | ".join(f"{_label(k)} {100 * v:.1f}%" for k, v in errors.items()),
                learning_rate,
                rate,
                _duration((self.total_steps - step) / steps_per_sec),
                f" | {int(sums['skipped'])} images skipped (undecodable, or no box in the crop)"
                if sums["skipped"]
                else "",
            )

    def eval(self, step: int, split: str, result: dict[str, float]) -> None:
        errors = {k: v for k, v in result.items() if k.endswith("_error")}
        self._write(step, {f"{split}/{k}": v for k, v in errors.items()})
        if jax.process_index() == 0:
            logging.info(
                "step %d | %s: %s on %d images",
                step,
                split,
                " | ".join(f"{_label(k)} {100 * v:.2f}%" for k, v in errors.items()),
                result["count"],
            )
        self.last_time = time.monotonic()  # evaluation time is not training time

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class Profiler:
    """A jax.profiler trace of train steps FIRST to LAST (`config.profile_steps`; () for none)
    in WORKDIR/profile, which TensorBoard's profile tab and XProf read; on process 0, as the
    Flax ImageNet example profiles. A run resumed past FIRST traces nothing."""

    def __init__(self, workdir: str, steps: tuple[int, ...], start_step: int):
        self.steps = tuple(steps) if jax.process_index() == 0 else ()
        self.logdir = str(storage.at(workdir) / "profile")
        self.tracing = False
        self.after(start_step, None)

    def after(self, step: int, state: Any) -> None:
        """Called once train step `step` is dispatched (its result `state`): starts the trace
        before step FIRST and stops it once step LAST is computed."""
        if self.steps and step == self.steps[0] - 1:
            jax.profiler.start_trace(self.logdir)
            self.tracing = True
            logging.info("Tracing steps %d to %d in %s.", *self.steps, self.logdir)
        if self.tracing and step == self.steps[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
