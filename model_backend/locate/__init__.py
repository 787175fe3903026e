"""Locating a photo: query embeddings, scoring, priors, candidates, verification, heatmap, export.
`pipeline.locate_photo` is the main job. Kept empty so `locate.export` imports no torch."""
