"""The layer table printed by `--mode=summary`: output shapes, parameters and multiply-adds.

Counted from the same layer list the module builds from, so it cannot drift from the model.
"""

from __future__ import annotations

import dataclasses

from vggjax.models import VGG


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    shape: tuple[int, int, int]  # output H, W, C
    params: int
    macs: int  # multiply-adds for one image


def layer_rows(model: VGG, image_size: int | None = None) -> list[Row]:
    """One row per layer for a square image (the crop by default); dense form beyond the crop."""
    size = image_size or model.crop_size
    h = w = size
    c = 3
    rows = []
    for layer in model.layers:
        if layer.kind == "conv":
            k, out = layer.kernel, layer.features
            rows.append(
                Row(layer.name, (h, w, out), k * k * c * out + out, h * w * k * k * c * out)
            )
            c = out
            if model.batch_norm:
                rows.append(Row(layer.name + "_bn", (h, w, c), 2 * c, h * w * c))
        elif layer.kind == "lrn":
            rows.append(Row(layer.name, (h, w, c), 0, 0))
        elif layer.kind == "pool":
            h, w = h // 2, w // 2
            rows.append(Row(layer.name, (h, w, c), 0, 0))
        else:
            window = layer.kernel
            h, w = h - window + 1, w - window + 1
            fan_in = window * window * c
            rows.append(
                Row(
                    layer.name,
                    (h, w, layer.features),
                    fan_in * layer.features + layer.features,
                    h * w * fan_in * layer.features,
                )
            )
            c = layer.features
    return rows


def format_summary(model: VGG, name: str, image_size: int | None = None) -> str:
    """The layer table as text, with totals."""
    rows = layer_rows(model, image_size)
    size = image_size or model.crop_size
    lines = [
        f"VGG {name} (Table 1 config {model.config}{', batch norm' if model.batch_norm else ''})"
        f" on {size}×{size}×3" + ("" if size == model.crop_size else " (dense form)"),
        f"{'layer':<12}{'output':>18}{'params':>16}{'multiply-adds':>18}",
    ]
    for r in rows:
        shape = "×".join(map(str, r.shape))
        lines.append(f"{r.name:<12}{shape:>18}{r.params:>16,}{r.macs:>18,}")
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    lines.append(f"{'total':<12}{'':>18}{params:>16,}{macs:>18,}")
    lines.append(f"{params / 1e6:.2f} M parameters, {macs / 1e9:.2f} G multiply-adds per image")
    return "\n".join(lines)
