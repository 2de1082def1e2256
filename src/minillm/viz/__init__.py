"""Plots: loss curves (metrics.py); attention maps come later."""
