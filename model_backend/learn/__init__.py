"""Learning from data: labelled pairs, model versions, adaptation, datasets, training.
Kept empty: the plugin imports `learn.labels` and `learn.versions` on QGIS's main thread without torch."""
