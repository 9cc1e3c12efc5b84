"""Applying trained models: load, predict, evaluate, report (see the modules)."""
