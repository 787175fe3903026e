"""The networks: weights to embeddings (EmbeddingModel), CPU runtimes, CDIKTNet's parts, peer weights.
Imports `core` and `geo`."""
