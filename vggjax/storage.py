"""Where a workdir lives: a local folder or a Cloud Storage bucket (`gs://bucket/path`).

Every file vggjax reads or writes in a workdir goes through etils `epath`, the path library
orbax and grain use too; for `gs://` it reads and writes through gcsfs (the `gcs` extra), and
orbax writes the arrays through tensorstore. `STORAGE_EMULATOR_HOST=http://HOST:PORT` (a local
emulator) is honoured by gcsfs and google-cloud-storage themselves; `_point_at_emulator` passes it
on to the parts that do not read it.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import numpy as np
from etils import epath

from vggjax.errors import UserError

GCS_EXTRA = "pip install 'vggjax[gcs]'"


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith("gs://")


def at(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a `gs://` URI as it is, a local path absolute with `~` expanded."""
    path = os.fspath(path)
    if not is_gcs(path):
        return epath.Path(os.path.abspath(os.path.expanduser(path)))
    _set_up_clients(path)
    return epath.Path(path)


def _set_up_clients(path: str) -> None:
    """The Cloud Storage clients, there or a UserError naming the extra; fresh folder listings."""
    _point_at_emulator()  # before gcsfs is imported: it reads its switches at import
    for client in ("gcsfs", "google.cloud.storage"):
        try:
            importlib.import_module(client)
        except ImportError:
            raise UserError(
                f"{path}: Cloud Storage paths need the gcs extra ({client} is not installed): "
                f"{GCS_EXTRA}"
            ) from None
    # gcsfs keeps every folder listing it made, for good: a process would not see the steps
    # other processes (a pod's other hosts, the run a notebook polls) wrote since.
    import fsspec  # gcsfs's own dependency

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def _point_at_emulator() -> None:
    """Sends tensorstore (orbax's array storage) to STORAGE_EMULATOR_HOST, with a placeholder
    token instead of looking for Google credentials an emulator does not check; and keeps gcsfs
    from asking the emulator for its bucket layout over gRPC, which emulators do not serve
    (gcsfs warns at every file otherwise). Variables the user set are left as they are."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a file, making a local folder for it if missing (a bucket needs no folders)."""
    file = at(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2))


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """The JSON file at `path`: a UserError saying `missing` where there is none, or naming the
    file and the fault where it is not valid JSON."""
    try:
        return json.loads(at(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(missing) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez through epath, as a stream: a file on Cloud Storage cannot seek back."""
    file = at(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("wb") as f:
        np.savez(f, **arrays)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file, local or on Cloud Storage."""
    with at(path).open("rb") as f, np.load(f) as npz:
        return {k: npz[k] for k in npz.files}
