"""Tiny networks, encoders and image folders shared by the encoder tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.model.encoder import Encoder, EncoderConfig
from stylegan.checkpoint import save_networks
from stylegan.imageutil import save_image, to_uint8
from stylegan.networks import (Discriminator, DiscriminatorConfig, Generator, GeneratorConfig,
                               ToRGBLayer)

E_BASE, E_MAX = 256, 32  # encoder channels: 16 px -> 16, 8 -> 32, 4 -> 32


@torch.no_grad()
def tiny_networks(res: int = 16, *, seed: int = 0, z_dim: int = 16,
                  w_dim: int = 16) -> tuple[Generator, Discriminator]:
    """A random tiny G (toRGB scaled so images mostly lie in [-1, 1], w_avg = mean mapped w)
    and a random tiny D, both in eval mode."""
    torch.manual_seed(seed)
    G = Generator(GeneratorConfig(z_dim=z_dim, w_dim=w_dim, img_resolution=res, channel_base=256,
                                  channel_max=32, mapping_layers=2)).eval()
    D = Discriminator(DiscriminatorConfig(img_resolution=res, channel_base=256,
                                          channel_max=32)).eval()
    for module in G.modules():
        if isinstance(module, ToRGBLayer):
            module.weight.mul_(0.4)
    G.mapping.w_avg.copy_(G.mapping(torch.randn(2000, z_dim), None)[:, 0].mean(dim=0))
    return G, D


def tiny_encoder(G: Generator, *, latent: str = "wplus") -> Encoder:
    cfg = EncoderConfig(img_resolution=G.img_resolution, img_channels=G.img_channels,
                        num_ws=G.num_ws, w_dim=G.w_dim, latent=latent, channel_base=E_BASE,
                        channel_max=E_MAX)
    return Encoder(cfg, w_avg=G.mapping.w_avg)


def random_head_encoder(G: Generator, *, seed: int = 3) -> Encoder:
    """A tiny encoder in eval mode whose head is random (N(0, 0.3^2), seeded), so that its codes
    and reconstructions depend on the input (a fresh head maps every image near w_avg)."""
    E = tiny_encoder(G)
    with torch.no_grad():
        E.head.weight.copy_(torch.randn(E.head.weight.shape,
                                        generator=torch.Generator().manual_seed(seed)) * 0.3)
    return E.eval()


def save_tiny_networks(path: Path, G: Generator, D: Discriminator | None) -> Path:
    return save_networks(path, G=G, D=D, G_ema=G)


@torch.no_grad()
def sample_images(G: Generator, n: int, *, seed: int) -> np.ndarray:
    """n images of G for RandomState(seed) latents, as uint8 [n, H, W, C] (what a PNG holds)."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(n, G.z_dim).astype(np.float32))
    return to_uint8(G(z, None, noise_mode="const"))


def write_folder(folder: Path, images_nhwc: np.ndarray, *, prefix: str = "img") -> list[str]:
    """Write uint8 images as PNGs named <prefix>NNNN.png; returns the names."""
    names = [f"{prefix}{i:04d}.png" for i in range(len(images_nhwc))]
    for name, image in zip(names, images_nhwc):
        save_image(image, folder / name)
    return names


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from threads, and on a busy 2-core machine OpenMP barriers make
    them many times slower: compute on one thread, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
