"""anomaly/model/reconstruct.py, `anostyle reconstruct` and the passes of
anomaly/model/ano_model.py: G(E(x)), discriminator features, safe output names, residual colours,
plain folders of any-size images, zips, and the one-sentence errors."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from anomaly.cli import main
from anomaly.model.encoder_io import save_encoder
from anomaly.model.ano_model import (check_feature_layer, discriminator_features,
                                     feature_layer_names, reconstruct_batch)
from anomaly.model.reconstruct import RESIDUAL_VMAX, output_name, output_paths, residual_images
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_encoder,
                             tiny_networks, write_folder)
from stylegan.errors import UserError
from stylegan.imageutil import from_uint8, to_uint8


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Tiny G, D and an encoder whose head is random (so G(E(x)) depends on x), saved to files."""
    root = tmp_path_factory.mktemp("nets")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    network = save_tiny_networks(root / "net.safetensors", G, D)
    encoder = root / "encoder-000010.safetensors"
    save_encoder(encoder, E)
    return {"G": G, "D": D, "E": E, "network": str(network), "encoder": str(encoder),
            "root": root}


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_reconstruct_batch_is_synthesis_of_the_code(nets):
    G, E = nets["G"], nets["E"]
    x = from_uint8(torch.from_numpy(sample_images(G, 3, seed=5).transpose(0, 3, 1, 2).copy()))
    with torch.no_grad():
        ws, rec = reconstruct_batch(G, E, x)
        assert torch.equal(ws, E(x))
        assert torch.equal(rec, G.synthesis(E(x), noise_mode="const"))
    assert not torch.allclose(ws[0], ws[1])


def test_discriminator_features_equal_the_full_trunk(nets):
    D = nets["D"]
    assert feature_layer_names(D) == ["b16", "b8", "b4.conv", "b4.fc"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        full = D.block_features(x)
        for name in feature_layer_names(D):
            torch.testing.assert_close(discriminator_features(D, x, name), full[name])
        # 6 images, minibatch-stddev groups of 4: padded with two copies of the last image
        x6 = torch.randn(6, 3, 16, 16)
        padded = D.block_features(torch.cat([x6, x6[-1:], x6[-1:]]))["b4.fc"][:6]
        torch.testing.assert_close(discriminator_features(D, x6, "b4.fc"), padded)
    with pytest.raises(UserError, match="--feature-layer 'b32' is not a layer of this "
                                        "discriminator; choose one of b16, b8, b4.conv, b4.fc"):
        check_feature_layer(D, "b32")


def test_output_names_never_leave_the_folder(tmp_path):
    assert output_name("a/b/../c.jpg").as_posix() == "a/b/c.png"
    assert output_name("../../evil.jpg").as_posix() == "evil.png"
    assert output_name("C:\\x\\y.JPG").as_posix() == "x/y.png"
    assert output_name("/etc/passwd.png").as_posix() == "etc/passwd.png"
    paths = output_paths(tmp_path, ("../x.png", "d/y.bmp"))
    assert paths["../x.png"] == (tmp_path / "x.png").resolve()
    assert paths["d/y.bmp"] == (tmp_path / "d" / "y.png").resolve()
    with pytest.raises(UserError, match="'a.jpg' and 'a.png' would both be written as a.png"):
        output_paths(tmp_path, ("a.jpg", "a.png"))


def test_residual_colours_use_a_fixed_scale():
    x = torch.zeros(1, 3, 2, 2)
    rec = torch.tensor([0.0, -RESIDUAL_VMAX / 2, -1.0, 2.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    heat = residual_images(x, rec)
    assert heat.shape == (1, 2, 2, 3) and heat.dtype == np.uint8
    cmap = mpl.colormaps["inferno"]
    for (i, j), level in {(0, 0): 0.0, (0, 1): 0.5, (1, 0): 1.0, (1, 1): 1.0}.items():
        expected = np.rint(np.array(cmap(level)[:3]) * 255)
        assert np.array_equal(heat[0, i, j], expected), (i, j, heat[0, i, j], expected)


def hand_fit(path: Path, res: int) -> np.ndarray:
    """What `prepare` does to a raw photo, written out by hand: JPEG draft decoding (DCT-domain
    downscale keeping both sides >= res), center square, box resize."""
    img = Image.open(path)
    img.draft("RGB", (res, res))
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.resize((res, res), Image.Resampling.BOX, box=box))  # [H, W, 3]


def test_cli_plain_folder_of_raw_photos(nets, ham_dir, tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    jpgs = sorted((ham_dir / "images").glob("*.jpg"))[:2]
    shutil.copy(jpgs[0], src / "first.jpg")
    shutil.copy(jpgs[1], src / "sub" / "second.jpg")
    (src / "broken.jpg").write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    result = run_cli("reconstruct", "--network", nets["network"], "--encoder", nets["encoder"],
                     "--source", src, "--outdir", out, "--residual", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote 2 reconstructions" in result.output and "skipped broken.jpg" in result.output
    G, E = nets["G"], nets["E"]
    rows = {r["file"]: r for r in csv.DictReader(open(out / "reconstruction.csv"))}
    for name, photo in (("first", src / "first.jpg"),
                        ("sub/second", src / "sub" / "second.jpg")):
        fitted = hand_fit(photo, 16)
        x = from_uint8(torch.from_numpy(fitted.transpose(2, 0, 1)[None].copy()))
        with torch.no_grad():
            rec = G.synthesis(E(x), noise_mode="const")
        written = np.asarray(Image.open(out / f"{name}.png"))
        assert np.array_equal(written, to_uint8(rec)[0])
        assert (out / f"{name}_residual.png").is_file()
        assert float(rows[f"{name}.jpg"]["mse"]) == pytest.approx(float((x - rec).square().mean()),
                                                                   rel=1e-5)
        assert rows[f"{name}.jpg"]["output"] == f"{name}.png"


def test_cli_zip_keeps_sub_folders_inside_outdir(nets, tmp_path):
    images = sample_images(nets["G"], 3, seed=1)
    folder = tmp_path / "imgs"
    names = write_folder(folder, images)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(folder / names[0], "00000/a.png")
        zf.write(folder / names[1], "../evil.png")
        zf.write(folder / names[2], "b.png")
        zf.writestr("dataset.json", '{"labels": null}')
    out = tmp_path / "out" / "rec"
    result = run_cli("reconstruct", "--network", nets["network"], "--encoder", nets["encoder"],
                     "--source", archive, "--outdir", out, "--batch", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["00000/a.png", "b.png", "evil.png"]
    assert not (tmp_path / "out" / "evil.png").exists()
    x = from_uint8(torch.from_numpy(images[1].transpose(2, 0, 1)[None].copy()))
    with torch.no_grad():
        _ws, rec = reconstruct_batch(nets["G"], nets["E"], x)
    assert np.array_equal(np.asarray(Image.open(out / "evil.png")), to_uint8(rec)[0])


def test_cli_errors_are_one_sentence(nets, tmp_path):
    G32, D32 = tiny_networks(32)
    enc32 = tmp_path / "enc32.safetensors"
    save_encoder(enc32, tiny_encoder(G32))
    src = tmp_path / "src"
    write_folder(src, sample_images(nets["G"], 1, seed=0))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    base = ["reconstruct", "--outdir", tmp_path / "out", "--device", "cpu"]
    cases = [
        (["--network", nets["network"], "--encoder", enc32, "--source", src],
         "has resolution 32 but --network"),
        (["--network", nets["network"], "--encoder", nets["network"], "--source", src],
         "net.safetensors is a network checkpoint, not an encoder; pass it to --network"),
        (["--network", nets["encoder"], "--encoder", nets["encoder"], "--source", src],
         "encoder-000010.safetensors is an encoder checkpoint, not a network; pass it to "
         "--encoder"),
        (["--network", nets["network"], "--encoder", nets["encoder"], "--source", empty],
         "contains no images"),
        (["--network", nets["network"], "--encoder", tmp_path / "nope.safetensors",
          "--source", src], "nope.safetensors does not exist"),
        (["--network", nets["network"], "--encoder", nets["encoder"], "--source",
          tmp_path / "missing"], "--source " + str(tmp_path / "missing") + " does not exist"),
    ]
    for args, message in cases:
        result = run_cli(*base, *args)
        assert result.exit_code == 1, result.output
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
