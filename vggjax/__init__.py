"""vggjax: Very Deep Convolutional Networks (Simonyan & Zisserman, 2015) in JAX/Flax.

Importing vggjax changes nothing in your process: no environment variable, no restart, no
listener. For the speed vggjax's own programs get on a CPU, call `vggjax.tune_cpu()` first.
"""

import importlib
from typing import Any

# name → module: imported on first use, so `python -m vggjax.X` can restart itself
# (`tune_cpu(restart=True)`) before JAX loads.
_EXPORTS = {
    "create_model": "vggjax.models",
    "load_pretrained": "vggjax.pretrained",
    "tune_cpu": "vggjax.backend",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vggjax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
