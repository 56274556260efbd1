"""vggjax: Very Deep Convolutional Networks (Simonyan & Zisserman, 2015) in JAX/Flax."""

from vggjax.models import create_model
from vggjax.pretrained import load_pretrained

__all__ = ["create_model", "load_pretrained"]
