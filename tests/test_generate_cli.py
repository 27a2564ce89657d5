"""`anostyle generate` / `convert`: seed parsing, official latents, and exact PNG pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_legacy import G_CFG, make_sources, randomize, write_official_pickle

from anomaly.cli import main
from stylegan.checkpoint import save_networks
from stylegan.errors import UserError
from stylegan.generate import parse_seeds
from stylegan.networks import Generator, GeneratorConfig


@pytest.mark.parametrize("text,seeds", [
    ("0-7,12", [0, 1, 2, 3, 4, 5, 6, 7, 12]),
    (" 3, 1-2", [3, 1, 2]),
    ("0-3,2", [0, 1, 2, 3]),
    ("42", [42]),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "5-2", "1,,2", "-3", "1-2-3", str(2**32)])
def test_parse_seeds_rejects_bad_syntax(text):
    with pytest.raises(UserError, match="--seeds"):
        parse_seeds(text)


def expected_pixels(G: Generator, seeds: list[int], **kwargs) -> np.ndarray:
    """Official recipe written out: RandomState latents, (img * 127.5 + 128).clamp, uint8, NHWC."""
    z = np.concatenate([np.random.RandomState(s).randn(1, G.z_dim) for s in seeds])
    with torch.no_grad():
        img = G(torch.from_numpy(z.astype(np.float32)), None, **kwargs)
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_generate_writes_official_pixels_from_G_ema(tmp_path):
    sources = make_sources()
    ckpt = save_networks(tmp_path / "net", G=sources["G"], G_ema=sources["G_ema"])
    result = run("generate", "--network", str(ckpt), "--seeds", "0-2,7",
                 "--outdir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png", "seed0007.png"]
    expected = expected_pixels(sources["G_ema"], [0, 1, 2, 7], noise_mode="const")
    from_G = expected_pixels(sources["G"], [0, 1, 2, 7], noise_mode="const")
    assert not np.array_equal(expected, from_G)  # so the check below tells G_ema from G
    for image, seed in zip(expected, [0, 1, 2, 7]):
        assert np.array_equal(read_png(tmp_path / "out" / f"seed{seed:04d}.png"), image)
    grid = read_png(tmp_path / "out" / "grid.png")
    assert grid.shape == (32, 32, 3)  # 4 images of 16 px in 2 x 2
    assert np.array_equal(grid[:16, 16:], expected[1])
    assert np.array_equal(grid[16:, 16:], expected[3])


def test_generate_truncation_and_batches(tmp_path):
    sources = make_sources()
    ckpt = save_networks(tmp_path / "net", G_ema=sources["G_ema"])
    result = run("generate", "--network", str(ckpt), "--seeds", "5-6", "--trunc", "0.5",
                 "--batch", "2", "--outdir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    expected = expected_pixels(sources["G_ema"], [5, 6], truncation_psi=0.5)
    assert np.array_equal(read_png(tmp_path / "out" / "seed0006.png"), expected[1])


def test_generate_grayscale_network(tmp_path):
    cfg = GeneratorConfig(**{**G_CFG.__dict__, "img_channels": 1})
    G = randomize(Generator(cfg), 7)
    ckpt = save_networks(tmp_path / "gray", G=G)
    assert run("generate", "--network", str(ckpt), "--seeds", "3",
               "--outdir", str(tmp_path / "o")).exit_code == 0
    image = Image.open(tmp_path / "o" / "seed0003.png")
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), expected_pixels(G, [3])[0, :, :, 0])


def test_generate_random_noise_is_repeatable(tmp_path):
    ckpt = save_networks(tmp_path / "net", G_ema=make_sources()["G_ema"])
    outs = []
    for name, mode in (("a", "random"), ("b", "random"), ("c", "const")):
        assert run("generate", "--network", str(ckpt), "--seeds", "1", "--noise-mode", mode,
                   "--outdir", str(tmp_path / name)).exit_code == 0
        outs.append(read_png(tmp_path / name / "seed0001.png"))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_conditional_network_needs_class(tmp_path):
    cfg = GeneratorConfig(**{**G_CFG.__dict__, "c_dim": 2})
    ckpt = save_networks(tmp_path / "cond", G=randomize(Generator(cfg), 1))
    result = run("generate", "--network", str(ckpt), "--seeds", "0", "--outdir", str(tmp_path))
    assert result.exit_code == 1
    assert "the network is conditional (2 classes); pass --class 0..1" in result.output
    assert "Traceback" not in result.output
    result = run("generate", "--network", str(ckpt), "--seeds", "0", "--class", "1",
                 "--outdir", str(tmp_path / "ok"))
    assert result.exit_code == 0 and (tmp_path / "ok" / "seed0000.png").is_file()


def test_convert_then_generate_from_official_pickle(tmp_path):
    sources = make_sources()
    pkl = write_official_pickle(tmp_path / "official.pkl", sources)
    result = run("convert", "--network", str(pkl), "--out", str(tmp_path / "ckpt"))
    assert result.exit_code == 0, result.output
    assert "G_ema: 16x16x3, z_dim 8, w_dim 8, c_dim 0, mapping 2 layers" in result.output
    converted = tmp_path / "ckpt" / "official.safetensors"
    assert converted.is_file()
    expected = expected_pixels(sources["G_ema"], [4])[0]
    for network, out in ((pkl, "from_pkl"), (converted, "from_ckpt")):
        assert run("generate", "--network", str(network), "--seeds", "4",
                   "--outdir", str(tmp_path / out)).exit_code == 0
        assert np.array_equal(read_png(tmp_path / out / "seed0004.png"), expected)


def test_convert_refuses_a_checkpoint(tmp_path):
    ckpt = save_networks(tmp_path / "net", G=make_sources()["G"])
    result = run("convert", "--network", str(ckpt), "--out", str(tmp_path))
    assert result.exit_code == 1 and "safetensors file" in result.output
