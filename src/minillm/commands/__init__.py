"""Subcommands of the `minillm` CLI, one module each (see minillm.cli)."""
