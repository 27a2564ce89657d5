"""anomaly/model/project.py and `anostyle project`: latent optimisation lowers the izif loss, each
image keeps its own code, the CSV holds the hand-computed starting loss (tiny networks, CPU)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from anomaly.cli import main
from anomaly.model.encoder_io import save_encoder
from anomaly.model.ano_model import discriminator_features
from anomaly.model.project import project_batch, projection_losses
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_networks,
                             write_folder)
from stylegan.checkpoint import save_networks
from stylegan.imageutil import from_uint8, to_uint8


@pytest.fixture(scope="module")
def nets():
    G, D = tiny_networks()
    return G.requires_grad_(False), D.requires_grad_(False)


def codes(G, n: int, seed: int) -> torch.Tensor:
    z = torch.from_numpy(np.random.RandomState(seed).randn(n, G.z_dim).astype(np.float32))
    with torch.no_grad():
        return G.mapping(z, None)  # [n, K, D]


def test_true_code_has_zero_loss(nets):
    G, D = nets
    ws = codes(G, 2, seed=0)
    with torch.no_grad():
        x = G.synthesis(ws, noise_mode="const")
        feat = discriminator_features(D, x, "b8")
        losses = projection_losses(G, D, ws, x, feat, kappa=1.0, feature_layer="b8")
    assert torch.equal(losses["loss"], torch.zeros(2))
    _ws, final = project_batch(G, D, x, ws, steps=0)
    assert torch.equal(final["loss"], torch.zeros(2)) and torch.equal(final["rec"], x)


def test_projection_from_w_avg_approaches_the_image(nets):
    G, D = nets
    with torch.no_grad():
        x = G.synthesis(codes(G, 2, seed=1), noise_mode="const")
    start = G.mapping.w_avg.expand(2, G.num_ws, -1)
    _ws, initial = project_batch(G, D, x, start, steps=0)
    _ws, final = project_batch(G, D, x, start, steps=60, lr=0.05, kappa=1.0)
    assert (final["image"] < 0.3 * initial["image"]).all(), (initial["image"], final["image"])
    assert (final["loss"] < 0.3 * initial["loss"]).all()


def test_images_of_a_batch_do_not_influence_each_other(nets):
    G, D = nets
    with torch.no_grad():
        x = G.synthesis(codes(G, 2, seed=2), noise_mode="const")
    start = G.mapping.w_avg.expand(2, G.num_ws, -1)
    ws_both, _ = project_batch(G, D, x, start, steps=5, lr=0.05)
    ws_0, _ = project_batch(G, D, x[:1], start[:1], steps=5, lr=0.05)
    ws_1, _ = project_batch(G, D, x[1:], start[1:], steps=5, lr=0.05)
    torch.testing.assert_close(ws_both, torch.cat([ws_0, ws_1]), rtol=1e-4, atol=1e-5)


def test_cli_project_writes_images_and_csv(nets, tmp_path):
    G, D = nets
    E = random_head_encoder(G, seed=4)
    network = save_tiny_networks(tmp_path / "net.safetensors", G, D)
    encoder = tmp_path / "enc.safetensors"
    save_encoder(encoder, E)
    images = sample_images(G, 3, seed=7)
    names = write_folder(tmp_path / "src", images)
    out = tmp_path / "projected"
    result = CliRunner().invoke(main, [
        "project", "--network", str(network), "--encoder", str(encoder), "--source",
        str(tmp_path / "src"), "--outdir", str(out), "--steps", "15", "--lr", "0.05",
        "--kappa", "0.5", "--batch", "2", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "projection.csv")))
    assert [r["file"] for r in rows] == names and [r["output"] for r in rows] == names
    x = from_uint8(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    with torch.no_grad():
        rec = G.synthesis(E(x), noise_mode="const")
        a_r = (x - rec).square().flatten(1).mean(dim=1)
        a_d = (discriminator_features(D, x, "b8") - discriminator_features(D, rec, "b8")) \
            .square().flatten(1).mean(dim=1)
    for i, row in enumerate(rows):
        assert float(row["initial_loss"]) == pytest.approx(float(a_r[i] + 0.5 * a_d[i]), rel=1e-5)
        assert float(row["loss"]) < float(row["initial_loss"])
        assert float(row["loss"]) == pytest.approx(
            float(row["image_loss"]) + 0.5 * float(row["feature_loss"]), rel=1e-5)
        written = np.asarray(Image.open(out / names[i]))
        assert written.shape == (16, 16, 3)
        assert not np.array_equal(written, to_uint8(rec)[i])  # it moved away from E(x)


def test_cli_project_needs_a_discriminator_for_the_feature_term(nets, tmp_path):
    G, _D = nets
    g_only = save_networks(tmp_path / "g_only.safetensors", G_ema=G)
    write_folder(tmp_path / "src", sample_images(G, 1, seed=0))
    args = ["project", "--network", str(g_only), "--source", str(tmp_path / "src"),
            "--outdir", str(tmp_path / "out"), "--steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "holds no discriminator" in result.output and "--kappa 0" in result.output
    result = CliRunner().invoke(main, args + ["--kappa", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(open(tmp_path / "out" / "projection.csv")))
    assert float(row["feature_loss"]) == 0 and float(row["loss"]) < float(row["initial_loss"])
