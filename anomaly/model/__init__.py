"""The model: the izif encoder and its checkpoints, the one inference model (`AnoModel`), training
the encoder, reconstruction and latent projection."""
