"""StyleGAN2 generator and discriminator (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"; ADA variant: Karras et al. 2020, "Training Generative Adversarial Networks
with Limited Data").

Pure PyTorch. Parameter and buffer names equal those of the official NVlabs networks, so that a
state dict read from an official snapshot loads with `load_state_dict(strict=True)`.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors (num_ws), D w_dim.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that shapes a Generator. Saved as JSON beside every checkpoint."""

    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_resolution: int = 256
    img_channels: int = 3
    mapping_layers: int = 8  # number of FC layers in the mapping network (--map-depth)
    mapping_lr_multiplier: float = 0.01
    mapping_layer_features: int | None = None  # hidden width of the mapping network; None: w_dim
    embed_features: int | None = None  # width of the class embedding; None: w_dim
    w_avg_beta: float = 0.998  # decay of the tracked average W
    channel_base: int = 32768  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 512
    num_fp16_res: int = 0  # highest resolutions computed in float16 (CUDA only)
    conv_clamp: float | None = None  # clamp activations to +-conv_clamp (256 in official configs)
    architecture: str = "skip"  # 'orig' | 'skip' | 'resnet'
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    use_noise: bool = True


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Everything that shapes a Discriminator. Saved as JSON beside every checkpoint."""

    c_dim: int = 0
    img_resolution: int = 256
    img_channels: int = 3
    architecture: str = "resnet"  # 'orig' | 'skip' | 'resnet'
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    cmap_dim: int | None = None  # width of the conditioning projection; None: channels at 4x4
    mapping_layers: int = 8  # layers of the conditioning mapping network (used when c_dim > 0)
    mbstd_group_size: int | None = 4  # minibatch-stddev group size; None: whole batch
    mbstd_num_channels: int = 1
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
