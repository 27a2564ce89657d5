"""Scoring: the model run over datasets, `anostyle score` and `tsne` (score sheets, heatmaps,
t-SNE) and `anostyle tune` (the detector's configuration chosen on validation)."""
