"""pcp_jax: efficient self-supervised neural architecture search in JAX/Flax."""

__version__ = '0.1.0'
