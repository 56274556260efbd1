"""What vggjax sets for itself on the CPU: XLA flags at `import vggjax`, huge pages for its
programs, and a faster compilation of random initialisation. The user's own settings win.

`--xla_cpu_experimental_ynn_fusion_type=individual_dot`: jax 0.10 hands convolutions,
reductions and matrix products to YNNPACK and fuses each product with what feeds it; in VGG's
forward pass that put the whole convolution stack inside the fusion of fc8's product, and in
the train step YNNPACK's kernel gradients ran 3× slower than XLA's own convolutions. With the
flag YNNPACK gets the matrix products alone and XLA's Eigen kernels the convolutions. On a 2-core
CPU (VGG16 at 224, batch 8, same run as PyTorch; BENCHMARKS.md, "VGG16 train step and inference"):
with JAX's defaults 0.63× PyTorch in training and 0.61× in inference; with the flag and
vggjax.winograd, 1.03–1.31× the stronger PyTorch in training, 0.81–1.10× in inference. The
gradients stay float32's (that section).

XLA reads XLA_FLAGS once, when JAX creates its first backend (the first computation or
`jax.devices()`), not at `import jax`: importing vggjax before that is what counts, and a
program that computed with JAX before importing vggjax keeps JAX's defaults. Flags under
`--xla_cpu_` change nothing on GPUs or TPUs. To override, set the flag in XLA_FLAGS yourself:
`--xla_cpu_experimental_ynn_fusion_type=+individual_dot` keeps JAX's own default list. Set only
with the jaxlib versions in JAXLIB_RANGE, which have the flag: XLA stops at one it does not know.

Huge pages (`use_huge_pages`): XLA's CPU runtime takes every temporary of a step from malloc,
about 2 GB for a VGG16 train step at batch 8, and glibc maps each large block afresh, so the
kernel faults it in 4 KB at a time (about 500,000 faults per step). glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (2 MB), but glibc reads it
only when a process starts, so a vggjax program (`python -m vggjax.X`, the benchmarks) restarts
itself with it before JAX loads: the same process id, arguments and environment, plus the
tunable. On a 2-core CPU (VGG16 at 224, batch 8): writing fresh memory 3.0-3.4 → 12-13 GB/s,
the forward pass 1.84 → 1.37-1.41 s, the train step 6.0 → 5.0 s (BENCHMARKS.md). A program of
the user's own that imports vggjax is not restarted: run it with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for the same. To opt out, set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0`. Needs Linux, glibc ≥ 2.35 and transparent huge pages
not `never`; elsewhere nothing happens.

Initialisation (`init_compiler_options`): a program that draws a net's random parameters is
threefry's integer arithmetic and a few float ops per draw, and XLA's CPU compiler spends about
0.5 s on each draw at its default LLVM optimisation level. Level 1 gives the same bits (every
kernel_init of vgg19_bn, and vgg16, vgg11_bn and the demo net, compared whole; level 0 does
not) and runs as fast. On a 2-core Zen 3 the tests' narrowed demo net's initial state compiled
in 1.8 s instead of 12.6 s, VGG16's in 2.6 s instead of 7.2 s: time every first run of a net
configuration pays.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import metadata

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "individual_dot"}
JAXLIB_RANGE = ((0, 10), (0, 12))  # [first, past the last) (major, minor) known to have them


def with_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with each of CPU_FLAGS it does not set appended."""
    given = _flag_names(xla_flags)
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def _flag_names(xla_flags: str) -> set[str]:
    """The flags an XLA_FLAGS value sets, by name: {"--xla_foo", ...}."""
    return {token.split("=", 1)[0] for token in xla_flags.split()}


def set_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds CPU_FLAGS to `environ`'s XLA_FLAGS, keeping every flag already there, if the
    installed jaxlib is in JAXLIB_RANGE."""
    if JAXLIB_RANGE[0] <= _jaxlib_version() < JAXLIB_RANGE[1]:
        environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options() -> dict[str, int]:
    """`jax.jit`'s compiler_options for a random initialisation: INIT_COMPILER_OPTIONS on the CPU
    unless XLA_FLAGS sets one of them, nothing elsewhere."""
    import jax  # not at the top: this module runs before a vggjax program restarts itself

    given = _flag_names(os.environ.get("XLA_FLAGS", ""))
    if jax.default_backend() != "cpu" or any(
        f"--{name}" in given for name in INIT_COMPILER_OPTIONS
    ):
        return {}
    return dict(INIT_COMPILER_OPTIONS)


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


HUGE_PAGES = "glibc.malloc.hugetlb"  # a glibc tunable: 1 = malloc madvises transparent huge pages
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never": [the mode]


def use_huge_pages(environ: MutableMapping[str, str] = os.environ) -> None:
    """Restarts this program (`os.execv`: same process, same command line) with
    `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES, unless it is set already, or this is not
    Linux with glibc ≥ 2.35 and transparent huge pages available. Returns only if it did not."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _tunable(tunables) is not None or not _can_use_huge_pages() or not sys.executable:
        return
    environ["GLIBC_TUNABLES"] = with_huge_pages(tunables, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def huge_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether this process's large mallocs get transparent huge pages: the kernel gives them
    to every large mapping, or it gives them where asked and `use_huge_pages`' tunable asks."""
    mode = _thp_mode()
    return mode == "always" or (
        mode == "madvise" and _tunable(environ.get("GLIBC_TUNABLES", "")) == "1"
    )


def with_huge_pages(tunables: str, on: bool) -> str:
    """A GLIBC_TUNABLES value: `tunables` with HUGE_PAGES set to 1 (`on`) or 0."""
    kept = [item for item in tunables.split(":") if item and item.partition("=")[0] != HUGE_PAGES]
    return ":".join([*kept, f"{HUGE_PAGES}={int(on)}"])


def _tunable(tunables: str) -> str | None:
    """HUGE_PAGES' value in a GLIBC_TUNABLES string ("name=value:name=value"), or None."""
    values = dict(item.partition("=")[::2] for item in tunables.split(":") if item)
    return values.get(HUGE_PAGES)


def _can_use_huge_pages() -> bool:
    if sys.platform != "linux" or _thp_mode() not in ("always", "madvise"):
        return False
    try:  # "glibc 2.36"; the tunable came with glibc 2.35
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except (ValueError, OSError, AttributeError):  # musl, or no such confstr name
        return False


def _thp_mode() -> str | None:
    try:
        with open(_THP) as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def setup_program() -> None:
    """What every vggjax program does first (cli.run): huge pages, then the CPU flags."""
    use_huge_pages()
    set_cpu_flags()
