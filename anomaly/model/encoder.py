"""izif encoder: image -> StyleGAN2 latent (W+ or W), after Schlegl et al. 2019, "f-AnoGAN: Fast
unsupervised anomaly detection with generative adversarial networks", Medical Image Analysis 54,
Sec. 2.2 (encoder E trained so that G(E(x)) ~ x with G and D frozen).

Differences from the paper's encoder, which maps to Z: this one maps to StyleGAN2's W+ space
(one style vector per synthesis input, Abdal et al. 2019, "Image2StyleGAN") or to a single W
broadcast to every input. The code is predicted as an offset from the generator's average latent
`w_avg`; the last layer starts at zero, so an untrained encoder returns exactly `w_avg`.

Architecture: the residual downsampling blocks of the StyleGAN2 discriminator (Karras et al. 2020,
Fig. 7), from img_resolution to 4x4, then a 3x3 conv, a fully connected layer and a linear head.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors (num_ws), D w_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stylegan.networks import Conv2dLayer, DiscriminatorBlock, FullyConnectedLayer, channels_at

LATENTS = ("wplus", "w")


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that shapes an Encoder. Saved as JSON in every encoder checkpoint."""

    img_resolution: int
    img_channels: int
    num_ws: int
    w_dim: int
    latent: str = "wplus"  # 'wplus': one code per style input; 'w': one code broadcast to all
    channel_base: int = 4096  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 256

    def __post_init__(self) -> None:
        res = self.img_resolution
        assert res >= 8 and res & (res - 1) == 0, f"img_resolution {res} must be a power of 2 >= 8"
        assert self.img_channels in (1, 3), self.img_channels
        assert self.num_ws >= 1 and self.w_dim >= 1, (self.num_ws, self.w_dim)
        assert self.latent in LATENTS, f"latent must be one of {LATENTS}, got {self.latent!r}"
        channels = channels_at(res, channel_base=self.channel_base, channel_max=self.channel_max)
        assert channels >= 1, f"channel_base {self.channel_base} gives no channels at {res} px"

    @property
    def num_codes(self) -> int:
        """How many w_dim vectors the head predicts (num_ws for W+, 1 for W)."""
        return self.num_ws if self.latent == "wplus" else 1


class Encoder(nn.Module):
    """Images [N, C, H, W] in [-1, 1] -> ws [N, K, D] = w_avg + predicted offset."""

    def __init__(self, cfg: EncoderConfig, *, w_avg: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        self.num_ws, self.w_dim = cfg.num_ws, cfg.w_dim
        ch = {res: channels_at(res, channel_base=cfg.channel_base, channel_max=cfg.channel_max)
              for res in self._block_resolutions() + [4]}
        for res in self._block_resolutions():
            in_ch = 0 if res == cfg.img_resolution else ch[res]  # the first block has a fromRGB
            block = DiscriminatorBlock(in_ch, ch[res], ch[res // 2], res, cfg.img_channels,
                                       architecture="resnet")
            setattr(self, f"b{res}", block)
        self.conv4 = Conv2dLayer(ch[4], ch[4], 3, activation="lrelu")
        self.fc = FullyConnectedLayer(ch[4] * 16, ch[4], activation="lrelu")
        self.head = FullyConnectedLayer(ch[4], cfg.num_codes * cfg.w_dim)
        nn.init.zeros_(self.head.weight)  # untrained encoder -> offset 0 -> w_avg
        w_avg = torch.zeros([cfg.w_dim]) if w_avg is None else w_avg.detach().float().cpu().clone()
        assert tuple(w_avg.shape) == (cfg.w_dim,), f"w_avg must be [{cfg.w_dim}], got {w_avg.shape}"
        self.register_buffer("w_avg", w_avg)

    def _block_resolutions(self) -> list[int]:
        log2 = int(math.log2(self.cfg.img_resolution))
        return [2**i for i in range(log2, 2, -1)]  # img_resolution, ..., 8

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        res, c = self.img_resolution, self.img_channels
        assert img.ndim == 4 and img.shape[1:] == (c, res, res), \
            f"images must be [N, {c}, {res}, {res}], got {tuple(img.shape)}"
        x, rgb = None, img.to(torch.float32)
        for res in self._block_resolutions():
            x, rgb = getattr(self, f"b{res}")(x, rgb, force_fp32=True)  # [N, ch, res/2, res/2]
        x = self.conv4(x)  # [N, C4, 4, 4]
        x = self.fc(x.flatten(1))  # [N, C4]
        offset = self.head(x).reshape(-1, self.cfg.num_codes, self.w_dim)  # [N, 1 or K, D]
        offset = offset.expand(-1, self.num_ws, -1)  # [N, K, D]
        return self.w_avg + offset
