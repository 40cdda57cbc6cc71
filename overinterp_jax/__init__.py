"""overinterp_jax: Sufficient Input Subsets and overinterpretation analysis in JAX."""

__version__ = "0.1.0"
