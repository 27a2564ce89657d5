"""AnoStyle's own StyleGAN2-ADA: networks, augmentation, losses, datasets and training (pure PyTorch)."""
