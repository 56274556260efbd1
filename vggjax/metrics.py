"""What a user watches: a progress line on the console and TensorBoard scalars in the workdir.

Only process 0 writes, so a pod prints and logs each figure once.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Reporter:
    """Turns summed step metrics into error rates, images/s and time left."""

    def __init__(self, workdir: str, total_steps: int, batch_size: int, start_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self.last_step, self.last_time = start_step, time.monotonic()
        self.writer = None
        if jax.process_index() == 0:
            import tensorboardX  # event files without TensorFlow

            self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

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
        scalars = {
            "train/loss": sums["loss"] / n,
            "train/top1_error": sums["top1_errors"] / n,
            "train/top5_error": sums["top5_errors"] / n,
            "train/learning_rate": learning_rate,
            "train/images_per_sec": rate,
        }
        self._write(step, scalars)
        if jax.process_index() == 0:
            logging.info(
                "step %d/%d (%.0f%%) | loss %.4f | top-1 err %.1f%% | top-5 err %.1f%% | "
                "lr %.1e | %.0f img/s | %s left%s",
                step,
                self.total_steps,
                100 * step / self.total_steps,
                scalars["train/loss"],
                100 * scalars["train/top1_error"],
                100 * scalars["train/top5_error"],
                learning_rate,
                rate,
                _duration((self.total_steps - step) / steps_per_sec),
                f" | {int(sums['skipped'])} undecodable images skipped" if sums["skipped"] else "",
            )

    def eval(self, step: int, split: str, result: dict[str, float]) -> None:
        self._write(
            step,
            {
                f"{split}/top1_error": result["top1_error"],
                f"{split}/top5_error": result["top5_error"],
            },
        )
        if jax.process_index() == 0:
            logging.info(
                "step %d | %s: top-1 err %.2f%% | top-5 err %.2f%% on %d images",
                step,
                split,
                100 * result["top1_error"],
                100 * result["top5_error"],
                result["count"],
            )
        self.last_time = time.monotonic()  # evaluation time is not training time

    def close(self) -> None:
        if self.writer:
            self.writer.close()
