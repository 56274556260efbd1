"""vggjax: Very Deep Convolutional Networks (Simonyan & Zisserman, 2015) in JAX/Flax."""

from vggjax import backend

backend.set_cpu_flags()  # before JAX starts its backend: XLA reads XLA_FLAGS then

from vggjax.models import create_model  # noqa: E402
from vggjax.pretrained import load_pretrained  # noqa: E402

__all__ = ["create_model", "load_pretrained"]
