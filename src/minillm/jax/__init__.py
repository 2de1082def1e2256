"""The JAX twin of minillm.torch: layers, model, generate, train (and parallel) as pure functions
over the canonical params dict. Needs the `jax` extra (jax + optax); never imports torch."""
