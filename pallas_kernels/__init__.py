"""Pallas kernels for MSA's hot paths, one folder per op: kernel, pure-jnp reference, tile
config, parity tests and benchmark. `msa_jax` reaches them only through an `implementation=`
choice whose plain-XLA path (the functions in `msa_jax.math`) always works."""
