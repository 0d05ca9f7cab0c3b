"""Helpers shared by the benchmark studies: data, cached dense models, result rows, plots, `--set` overrides."""
