"""Tile indexes: the on-disk store, building it (resumable, sharded under torchrun), the compressed
ANN index. Imports `core`, `geo`, `nn`."""
