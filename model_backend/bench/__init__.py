"""Benchmarks and evaluation (`make bench`, `python -m model_backend evaluate`); never imported by
the layers below, and left out of the plugin zip."""
