"""Published VGG weights by name: fetched into their own library's cache, verified, converted once.

    python -m vggjax.convert --from=torchvision vgg16 --output=DIR
    vggjax.load_pretrained("torchvision:vgg16")

A name that is not a file is looked up in `WEIGHTS`, the official files with the checksum each
publisher gives: torchvision's file names carry the first hex digits of the file's SHA-256 (what
torch.hub checks), Keras gives each file's MD5 (`file_hash` in keras.applications), and the
Hugging Face Hub names each of timm's files by its SHA-256 (the blob in its cache). Files go where
their own library keeps them — `$TORCH_HOME/hub/checkpoints` (default
`~/.cache/torch/hub/checkpoints`), `$KERAS_HOME/models` (default `~/.keras/models`), the Hugging
Face cache — so a file either library already fetched is reused, after the same check.

A download goes to a temporary file beside its destination and is renamed only once verified, so
one cut off leaves nothing a later run takes for complete; a file that fails its checksum is
deleted. The converted checkpoint is cached in `$VGGJAX_CACHE/pretrained` (default
`~/.cache/vggjax/pretrained`), written apart and renamed into place the same way.

`VGGJAX_WEIGHTS_MIRROR=http://HOST:PORT` replaces the scheme and host of every URL (for timm, the
Hub's endpoint): for mirrors, and for the tests, which serve files of their own on the loopback
and point `WEIGHTS` entries at them (a published checksum cannot be met by a generated file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import posixpath
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO

import tqdm

from vggjax.errors import UserError

MIRROR_ENV = "VGGJAX_WEIGHTS_MIRROR"
# What a weight file's name ends with; anything else without a path separator is a net's name
# (timm's names hold a dot: vgg16.tv_in1k).
FILE_SUFFIXES = (".h5", ".hdf5", ".pth", ".pt", ".bin", ".safetensors", ".caffemodel")
TORCHVISION_URL = "https://download.pytorch.org/models/"
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
TIMM_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published file: where it is, the checksum its publisher gives, and the net it holds."""

    source: str  # as --from names it
    name: str  # as the user names it: vgg16, vgg16_notop, vgg16.tv_in1k
    model: str  # the Table 1 net (vggjax.models.resolve_name)
    url: str  # timm: the Hub repository, timm/<name>
    algorithm: str  # "sha256" or "md5"
    checksum: str  # hex: torchvision's is a prefix of the digest; timm's is the Hub's blob name

    @property
    def key(self) -> str:
        """The converted checkpoint's folder name: another file under the same name is another."""
        return f"{self.source}-{self.name}" + (f"-{self.checksum[:8]}" if self.checksum else "")


def _torchvision(model: str, file: str) -> Weights:
    digest = re.search(r"-([0-9a-f]+)\.pth$", file).group(1)  # torch.hub's HASH_REGEX
    return Weights("torchvision", model, model, TORCHVISION_URL + file, "sha256", digest)


def _keras(model: str, top: bool, md5: str) -> Weights:
    suffix = "" if top else "_notop"
    file = f"{model}/{model}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    return Weights("keras", model + suffix, model, KERAS_URL + file, "md5", md5)


def _timm(model: str) -> Weights:
    return Weights("timm", f"{model}.tv_in1k", model, f"timm/{model}.tv_in1k", "sha256", "")


# torchvision/models/vgg.py (IMAGENET1K_V1), keras/src/applications/vgg16.py and vgg19.py,
# timm/models/vgg.py's pretrained tags.
WEIGHTS: dict[tuple[str, str], Weights] = {
    (w.source, w.name): w
    for w in (
        _torchvision("vgg11", "vgg11-8a719046.pth"),
        _torchvision("vgg13", "vgg13-19584684.pth"),
        _torchvision("vgg16", "vgg16-397923af.pth"),
        _torchvision("vgg19", "vgg19-dcbb9e9d.pth"),
        _torchvision("vgg11_bn", "vgg11_bn-6002323d.pth"),
        _torchvision("vgg13_bn", "vgg13_bn-abd245e5.pth"),
        _torchvision("vgg16_bn", "vgg16_bn-6c64b313.pth"),
        _torchvision("vgg19_bn", "vgg19_bn-c79401a0.pth"),
        _keras("vgg16", True, "64373286793e3c8b2b4e3219cbf3544b"),
        _keras("vgg16", False, "6d6bbae143d832006294945121d1f1fc"),
        _keras("vgg19", True, "cbe5617147190e668d6c5d5026f83318"),
        _keras("vgg19", False, "253f8cb515780f3b799900260a226db6"),
        *map(_timm, ("vgg11", "vgg13", "vgg16", "vgg19")),
        *map(_timm, ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")),
    )
}


def cache_dir(source: str) -> str:
    """Where `source`'s own library keeps downloaded weights (timm's: the Hugging Face cache)."""
    if source == "torchvision":
        home = os.getenv("TORCH_HOME") or os.path.join(
            os.getenv("XDG_CACHE_HOME") or "~/.cache", "torch"
        )
        return os.path.join(os.path.expanduser(home), "hub", "checkpoints")
    return os.path.join(os.path.expanduser(os.getenv("KERAS_HOME") or "~/.keras"), "models")


def converted_dir() -> str:
    """Where converted published weights are cached: $VGGJAX_CACHE/pretrained."""
    cache = os.getenv("VGGJAX_CACHE") or os.path.expanduser("~/.cache/vggjax")
    return os.path.join(cache, "pretrained")


def is_name(file: str) -> bool:
    """Whether `file`, which does not exist, reads as a net's name rather than a missing file."""
    return "/" not in file and os.sep not in file and not file.lower().endswith(FILE_SUFFIXES)


def lookup(source: str, name: str) -> Weights:
    """The published file `name` of `source`; UserError listing the names there are."""
    if (source, name) in WEIGHTS:
        return WEIGHTS[source, name]
    names = [n for s, n in WEIGHTS if s == source]
    if not names:
        raise UserError(f"{name} is not a file, and --from={source} has no published names")
    raise UserError(f"{name} is neither a file nor a published {source} net ({', '.join(names)})")


def mirrored(url: str) -> str:
    """`url` with the scheme and host (and a path prefix) of $VGGJAX_WEIGHTS_MIRROR, if set."""
    mirror = os.getenv(MIRROR_ENV)
    if not mirror:
        return url
    m, u = urllib.parse.urlsplit(mirror), urllib.parse.urlsplit(url)
    if not (m.scheme and m.netloc):
        raise UserError(f"{MIRROR_ENV} must be a URL like http://HOST:PORT, got {mirror!r}")
    return urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def _digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _matches(digest: str, weights: Weights) -> bool:
    return digest.startswith(weights.checksum)  # torchvision's: a prefix


def _checksum_error(path: str, weights: Weights, digest: str) -> UserError:
    algorithm = weights.algorithm.upper().replace("SHA", "SHA-")
    return UserError(
        f"{path} failed its checksum and was deleted: {algorithm} {digest}, published "
        f"{weights.checksum}{'…' if len(weights.checksum) < len(digest) else ''} (run again to "
        f"download it anew)"
    )


def fetch(weights: Weights) -> str:
    """A verified local copy of `weights`' file: the one in its library's cache, else downloaded
    there (a cached copy that fails its checksum is replaced)."""
    if weights.source == "timm":
        return _fetch_from_hub(weights)
    path = os.path.join(
        cache_dir(weights.source), posixpath.basename(urllib.parse.urlsplit(weights.url).path)
    )
    if os.path.isfile(path):
        if _matches(_digest(path, weights.algorithm), weights):
            return path
        print(f"{path} fails its checksum; downloading it again", file=sys.stderr)
        os.remove(path)
    _download(mirrored(weights.url), path, weights)
    return path


def _download(url: str, path: str, weights: Weights) -> None:
    """`url` → `path` through a temporary file in the same folder, renamed only once verified."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, partial = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".partial"
    )
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _copy(url, out, weights.algorithm)
        if not _matches(digest, weights):
            raise _checksum_error(path, weights, digest)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _copy(url: str, out: BinaryIO, algorithm: str) -> str:
    """Writes `url`'s body to `out` with a progress bar (on a terminal); returns its digest."""
    print(f"Downloading {url}", file=sys.stderr)
    h, done = hashlib.new(algorithm, usedforsecurity=False), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"cannot download {url}: {reason} (a mirror: {MIRROR_ENV}=http://HOST:PORT)"
        ) from None
    if total is not None and done != total:
        raise UserError(f"the download of {url} was cut off after {done} of {total} bytes")
    return h.hexdigest()


def _fetch_from_hub(weights: Weights) -> str:
    """timm's file through huggingface_hub (its cache, its progress bar), checked against the
    SHA-256 the Hub names the file's blob by."""
    try:
        from huggingface_hub import constants, errors, hf_hub_download
    except ImportError:
        raise UserError(
            f"--from=timm {weights.name} downloads through huggingface_hub: "
            f"pip install huggingface_hub (or -e '.[hub]')"
        ) from None
    endpoint = mirrored(constants.ENDPOINT) if os.getenv(MIRROR_ENV) else None
    try:
        path = hf_hub_download(weights.url, TIMM_FILE, endpoint=endpoint)
    except (OSError, errors.EntryNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot download {weights.url}/{TIMM_FILE}: {first}") from None
    blob = os.path.realpath(path)
    published = os.path.basename(blob)
    if re.fullmatch(r"[0-9a-f]{64}", published):  # an LFS file: its name is its SHA-256
        digest = _digest(blob, "sha256")
        if digest != published:
            for p in {blob, path}:
                os.remove(p)
            raise _checksum_error(path, dataclasses.replace(weights, checksum=published), digest)
    return path


def weight_file(source: str, file: str, model: str | None) -> tuple[str, str]:
    """(path, model name) of what the command line gives: a file (with --model), or a published
    net's name, whose file is fetched and whose model is known."""
    if os.path.exists(file) or not is_name(file):
        if not model:
            raise UserError(
                f"--model is required for a file (e.g. --model=D or vgg16_bn); "
                f"a published net's name (--from={source} vgg16) knows its own"
            )
        return file, model
    weights = lookup(source, file)
    return fetch(weights), model or weights.model


def converted(source: str, name: str) -> str:
    """The workdir of published net `name` converted: from the cache, else fetched and converted
    into a temporary folder renamed into place (a concurrent run's finished one wins)."""
    from vggjax import convert as package  # the package imports this module

    weights = lookup(source, name)
    workdir = os.path.join(converted_dir(), weights.key)
    if os.path.isdir(workdir):
        return workdir
    path = fetch(weights)
    os.makedirs(converted_dir(), exist_ok=True)
    partial = tempfile.mkdtemp(dir=converted_dir(), prefix=f".{weights.key}.", suffix=".partial")
    try:
        package.convert(source, path, weights.model, partial)
        os.rename(partial, workdir)
    except OSError:
        if not os.path.isdir(workdir):
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return workdir
