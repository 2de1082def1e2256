"""Plots: loss curves (metrics.py), attention maps and the logit lens (attention.py), sweeps and
run comparisons (compare.py), and every figure of the docs (figures.py over the fig_*.py modules)."""
