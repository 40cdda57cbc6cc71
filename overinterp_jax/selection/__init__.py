"""Compiled programs behind ``overinterp_jax.sis`` (backward selection and its records)."""
