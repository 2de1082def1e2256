"""minillm: a small language model built from scratch, readable end to end.

Importing the package imports no framework: `minillm.torch` and `minillm.jax` are separate.
"""

__version__ = "0.1.0"
