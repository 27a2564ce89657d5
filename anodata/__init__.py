"""AnoStyle's data: raw image sources, the one image reader, dataset preparation and the
preprocessing policy (the pipeline's first step, below the GAN and the anomaly scores)."""
