"""vggjax: Very Deep Convolutional Networks (Simonyan & Zisserman, 2015) in JAX/Flax."""

import sys

from vggjax import backend

if sys.argv[:1] == ["-m"]:  # `python -m vggjax.X` is starting (sys.argv[0] is "-m" until it runs)
    backend.use_huge_pages()  # restarts it now, before JAX loads, with huge pages if possible
backend.set_cpu_flags()  # before JAX starts its backend: XLA reads XLA_FLAGS then

from vggjax.models import create_model  # noqa: E402
from vggjax.pretrained import load_pretrained  # noqa: E402

__all__ = ["create_model", "load_pretrained"]
