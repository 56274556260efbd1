"""What vggjax's programs set for speed on a CPU, and the one call that gives any program the same.

Importing vggjax sets nothing. `tune_cpu()` applies four settings; every vggjax command line
calls it first (`vggjax.cli`), and a program of your own may call it at its top, before it
computes anything with JAX:

- XLA_FLAGS gains CPU_FLAGS: no YNNPACK fusions, so XLA's own kernels compute the convolutions
  and Eigen the matrix products. JAX's default fuses whole convolution stacks into YNNPACK, far
  slower; YNNPACK's products alone ran single-threaded at small sizes (Winograd's batched
  products of a 32-pixel net), 10% of configs/small_images.py's step. XLA reads XLA_FLAGS when
  JAX creates its backend, so flags set after the first computation change nothing. A flag you
  set wins.
- With `restart=True`, the process restarts itself (`os.execve`: the same command line) with
  cheaper memory for XLA's CPU runtime, which takes a step's temporaries (60 MB for
  configs/small_images.py's step) from malloc and frees them after it (`use_fast_memory`):
  - glibc's malloc asking for transparent huge pages: fresh memory faulted in 2 MB at a time is
    several times cheaper than 4 KB at a time. To opt out, set
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
  - where the system has it (Debian/Ubuntu: `libtcmalloc-minimal4`), gperftools' tcmalloc in
    place of glibc's malloc (`LD_PRELOAD`): it keeps freed memory for the next step, where glibc
    returns it to the kernel, which zeroes it again on the next step's page faults (10% of the
    CPU time of that step). To opt out, set `LD_PRELOAD` yourself (empty: nothing preloaded).
  The loader and glibc read these only when a process starts.
- Winograd's F(4×4, 3×3) for the layers where it beat XLA's convolution, by the rules measured
  for this process's pages (`vggjax.convolution.set_winograd`).
- Random initialisation compiled at LLVM level 1 (`init_compiler_options`): the same bits, a few
  times faster to compile.

`VGGJAX_CPU_TUNING=0` turns all four off: `tune_cpu` then does nothing. Flags under `--xla_cpu_`
and the rest change nothing on GPUs or TPUs. What each setting gains, measured: BENCHMARKS.md
("CPU defaults").
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, MutableMapping
from importlib import metadata

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}  # none: BENCHMARKS.md, seventh pass
JAXLIB_RANGE = ((0, 10), (0, 12))  # [first, past the last) (major, minor) known to have them


def with_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with each of CPU_FLAGS it does not set appended."""
    given = _flag_names(xla_flags)
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def _flag_names(xla_flags: str) -> set[str]:
    """The flags an XLA_FLAGS value sets, by name: {"--xla_foo", ...}."""
    return {token.split("=", 1)[0] for token in xla_flags.split()}


OFF_SWITCH = "VGGJAX_CPU_TUNING"  # "0": tune_cpu() does nothing
_tuned = False  # whether tune_cpu() ran in this process (and was not switched off)


def tune_cpu(*, restart: bool = False) -> bool:
    """Makes this process run VGG on a CPU as vggjax's programs do (the module docstring).

    Args:
      restart: also restart the process with cheaper memory (`use_fast_memory`), before it goes
        on (vggjax's command lines do; in a notebook or a program that has done work, leave it
        off).

    Returns:
      Whether the settings were applied: False where `VGGJAX_CPU_TUNING=0`.
    """
    global _tuned
    if os.environ.get(OFF_SWITCH) == "0":
        return False
    set_cpu_flags()
    if restart:
        use_fast_memory()
    from vggjax import convolution  # after the restart: it imports JAX

    convolution.set_winograd("huge_pages" if huge_pages() else "small_pages")
    _tuned = True
    return True


def set_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds CPU_FLAGS to `environ`'s XLA_FLAGS, keeping every flag already there, if the
    installed jaxlib is in JAXLIB_RANGE."""
    if JAXLIB_RANGE[0] <= _jaxlib_version() < JAXLIB_RANGE[1]:
        environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options() -> dict[str, int]:
    """`jax.jit`'s compiler_options for a random initialisation: INIT_COMPILER_OPTIONS on the CPU
    after `tune_cpu`, unless XLA_FLAGS sets one of them; nothing elsewhere."""
    import jax  # not at the top: this module runs before a vggjax program restarts itself

    given = _flag_names(os.environ.get("XLA_FLAGS", ""))
    if (
        not _tuned
        or jax.default_backend() != "cpu"
        or any(f"--{name}" in given for name in INIT_COMPILER_OPTIONS)
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


TCMALLOC = "tcmalloc_minimal"  # gperftools' malloc, as ctypes.util.find_library names it
PRELOAD = "LD_PRELOAD"  # the dynamic loader's libraries to load first


def use_fast_memory(environ: MutableMapping[str, str] = os.environ) -> None:
    """Restarts this program (`os.execve`: same process, same command line) with the memory
    settings of `fast_memory_environment`, unless it has them already. Returns only if not."""
    changes = fast_memory_environment(environ)
    if not changes or not sys.executable:
        return
    environ.update(changes)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def fast_memory_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What `use_fast_memory` changes in `environ`: `glibc.malloc.hugetlb=1` added to
    GLIBC_TUNABLES (unless set, or not Linux with glibc >= 2.35 and transparent huge pages), and
    LD_PRELOAD set to tcmalloc (unless set, or the system has no tcmalloc)."""
    changes = {}
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _tunable(tunables) is None and _can_use_huge_pages():
        changes["GLIBC_TUNABLES"] = with_huge_pages(tunables, True)
    library = fast_malloc()
    if PRELOAD not in environ and library:
        changes[PRELOAD] = library
    return changes


def fast_malloc() -> str | None:
    """tcmalloc's library, as LD_PRELOAD takes it, if this system has it; else None."""
    return ctypes.util.find_library(TCMALLOC) if sys.platform == "linux" else None


def malloc(environ: Mapping[str, str] = os.environ) -> str:
    """The malloc this process started with: "tcmalloc" (preloaded) or "glibc"."""
    return "tcmalloc" if "tcmalloc" in environ.get(PRELOAD, "") else "glibc"


def huge_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether this process's large mallocs get transparent huge pages: the kernel gives them
    to every large mapping, or it gives them where asked and `use_fast_memory`'s tunable asks."""
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
