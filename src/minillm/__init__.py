"""minillm: a small language model built from scratch, readable end to end.

README.md ("Layout") maps where each concept lives. Importing the package imports no framework.
"""

__version__ = "0.1.0"
