"""anomaly/model/fit.py and `anostyle train-encoder`: the izif loss by hand, training that
measurably inverts a tiny generator, exact resume, NaN stop, run-folder files and one-sentence
errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import anomaly.model.fit as fit_mod
from anomaly.cli import main
from anomaly.model.encoder_io import load_encoder, state_path
from stylegan.runtime import EndlessSampler
from anomaly.model.fit import FitOptions, fit_encoder, izif_loss, w_reg_loss
from anomaly.methods.scores import izif_score
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import sample_images, save_tiny_networks, tiny_networks, write_folder
from stylegan.checkpoint import save_networks
from stylegan.errors import UserError
from stylegan.imageutil import from_uint8
from stylegan.networks import Discriminator, DiscriminatorConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny G/D saved to a file and 'training images' sampled from G itself (so that a perfect
    encoder exists), plus held-out samples."""
    root = tmp_path_factory.mktemp("fit")
    G, D = tiny_networks()
    network = save_tiny_networks(root / "net.safetensors", G, D)
    train = sample_images(G, 192, seed=1)
    write_folder(root / "train", train)
    return {"G": G, "D": D, "network": str(network), "data": str(root / "train"),
            "train": train, "heldout": sample_images(G, 64, seed=2)}


def options(setup, outdir, **overrides) -> FitOptions:
    kwargs = dict(network=setup["network"], data=setup["data"], outdir=str(outdir), iters=4,
                  batch=8, lr=2e-3, snap=0, tick=2, workers=0, device="cpu", cbase=256, cmax=32)
    kwargs.update(overrides)
    return FitOptions(**kwargs)


def quiet(message: str) -> None:
    pass


def as_float(images_nhwc: np.ndarray) -> torch.Tensor:
    return from_uint8(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()))


def stats(outdir) -> list[dict]:
    return [json.loads(line) for line in open(outdir / "stats.jsonl")]


# ------------------------------------------------------------------ pure pieces


def test_izif_loss_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    rec = torch.full((2, 1, 2, 2), 0.5)  # every pixel off by 0.5 -> 0.25
    feat = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    feat_rec = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # squared errors 0, 1, 4, 0 -> mean 1.25
    out = izif_loss(x, rec, feat, feat_rec, kappa=2.0)
    assert float(out["image"]) == 0.25 and float(out["feature"]) == 1.25
    assert float(out["loss"]) == 0.25 + 2 * 1.25
    assert float(out["loss"]) == pytest.approx(float(izif_score(x, rec, feat, feat_rec,
                                                                 kappa=2.0).mean()))
    assert float(izif_loss(x, rec, None, None, kappa=0.0)["loss"]) == 0.25


def test_w_reg_is_normalised_by_the_spread():
    w_avg = torch.tensor([1.0, -1.0])
    ws = torch.tensor([[[3.0, -1.0], [1.0, 1.0]]])  # squared offsets 4, 0, 0, 4 -> mean 2
    assert float(w_reg_loss(ws, w_avg, 0.5)) == 4.0


def test_sampler_continues_where_it_stopped():
    full = EndlessSampler(10, seed=3, seed_stride=1_000_003)
    first_25 = [i for _, i in zip(range(25), iter(full))]
    assert sorted(first_25[:10]) == list(range(10)) and sorted(first_25[10:20]) == list(range(10))
    assert first_25[:10] != first_25[10:20]  # a new permutation per epoch
    resumed = EndlessSampler(10, seed=3, start=13, seed_stride=1_000_003)
    assert [i for _, i in zip(range(12), iter(resumed))] == first_25[13:25]


# ------------------------------------------------------------------ training


def test_training_inverts_the_generator(setup, tmp_path):
    """Reconstructions of the training images (and of held-out samples) end up much closer to
    their inputs than G(w_avg), where the encoder starts, and than a random G sample; the loss
    falls. An encoder that learned nothing would give exactly the G(w_avg) error and fail."""
    out = tmp_path / "run"
    last = fit_encoder(options(setup, out, iters=120, tick=20, snap=60), echo=quiet)
    assert last.name == "encoder-000120.safetensors"
    records = stats(out)
    assert [r["iter"] for r in records] == [20, 40, 60, 80, 100, 120]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert all(r["loss"] == pytest.approx(r["image_loss"] + r["feature_loss"]) for r in records)
    G = setup["G"]
    E, extra = load_encoder(last)
    assert extra["iter"] == 120 and extra["kimg"] == 120 * 8 / 1000
    for images in (setup["train"], setup["heldout"]):
        x = as_float(images)
        with torch.no_grad():
            rec = G.synthesis(E(x), noise_mode="const")
            start = G.synthesis(G.mapping.w_avg.expand(1, G.num_ws, -1), noise_mode="const")
        rec_mse = float((x - rec).square().mean())
        start_mse = float((x - start).square().mean())
        random_mse = float((x[: len(x) // 2] - x[len(x) // 2:]).square().mean())
        assert rec_mse < 0.5 * start_mse and rec_mse < 0.5 * random_mse, \
            (rec_mse, start_mse, random_mse)
    for it in (60, 120):
        assert state_path(out / f"encoder-{it:06d}.safetensors").is_file()
        grid = Image.open(out / f"rec{it:06d}.png")
        assert grid.size == (8 * 16, 2 * 16)  # 8 training images over their 8 reconstructions
    reals = np.asarray(grid)[:16, :16]
    assert np.array_equal(reals, setup["train"][0])  # the fixed set starts with image 0
    info = json.loads((out / "encoder_options.json").read_text())
    assert info["total_iters"] == 120 and info["encoder"]["channel_base"] == 256
    assert info["network"]["generator"]["img_resolution"] == 16
    assert len(info["network"]["sha256"]) == 64
    assert "checkpoint encoder-000120.safetensors" in (out / "log.txt").read_text()


def test_encoder_is_as_wide_as_the_discriminator_by_default(setup, tmp_path):
    G = setup["G"]
    D_narrow = Discriminator(DiscriminatorConfig(img_resolution=16, channel_base=128,
                                                 channel_max=16))
    network = save_networks(tmp_path / "narrow.safetensors", G=G, D=D_narrow, G_ema=G)
    last = fit_encoder(options(setup, tmp_path / "run", network=str(network), iters=1,
                               cbase=None, cmax=None), echo=quiet)
    E, _ = load_encoder(last)
    assert (E.cfg.channel_base, E.cfg.channel_max) == (128, 16)
    assert E.fc.weight.shape == (16, 16 * 16)  # min(128 // 4, 16) channels at 4x4
    last = fit_encoder(options(setup, tmp_path / "flags", network=str(network), iters=1,
                               cbase=64, cmax=None), echo=quiet)
    assert load_encoder(last)[0].cfg.channel_base == 64


def test_w_reg_keeps_codes_nearer_w_avg(setup, tmp_path):
    x = as_float(setup["train"][:32])
    spread = []
    for weight in (0.0, 5.0):
        last = fit_encoder(options(setup, tmp_path / f"reg{weight}", iters=30, w_reg=weight),
                           echo=quiet)
        E, _ = load_encoder(last)
        with torch.no_grad():
            spread.append(float((E(x) - setup["G"].mapping.w_avg).square().mean()))
    assert spread[1] < 0.5 * spread[0], spread
    assert "w_reg" in stats(tmp_path / "reg5.0")[0]


def test_resume_continues_exactly(setup, tmp_path):
    straight = fit_encoder(options(setup, tmp_path / "a", iters=8, snap=4), echo=quiet)
    fit_encoder(options(setup, tmp_path / "b", iters=4, snap=4), echo=quiet)
    with open(tmp_path / "b" / "stats.jsonl", "a") as f:  # a tick logged after the last snapshot
        f.write(json.dumps({"iter": 6, "loss": 1.0}) + "\n")
    resumed = fit_encoder(options(setup, tmp_path / "b", iters=8, snap=4, resume="latest"),
                          echo=quiet)
    assert resumed.name == straight.name == "encoder-000008.safetensors"
    E_a, _ = load_encoder(straight)
    E_b, _ = load_encoder(resumed)
    for (name, a), (_, b) in zip(E_a.state_dict().items(), E_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["iter"] for r in stats(tmp_path / "b")] == [2, 4, 6, 8]
    assert [r["loss"] for r in stats(tmp_path / "b")] == [r["loss"] for r in stats(tmp_path / "a")]
    with pytest.raises(UserError, match="trained with latent 'wplus', not 'w'"):
        fit_encoder(options(setup, tmp_path / "b", iters=9, resume="latest", latent="w"))


def test_nan_loss_stops_with_a_clear_message(setup, tmp_path, monkeypatch):
    real = fit_mod.izif_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(fit_mod, "izif_loss", poisoned)
    with pytest.raises(UserError, match=r"the encoder loss became nan at iteration 3; lower --lr"):
        fit_encoder(options(setup, tmp_path / "nan", iters=10, snap=2), echo=quiet)
    assert [p.name for p in sorted((tmp_path / "nan").glob("encoder-*.safetensors"))] == \
        ["encoder-000002.safetensors"]


def test_setup_errors_are_one_sentence(setup, tmp_path):
    with pytest.raises(UserError, match="--feature-layer 'b64' is not a layer of this "
                                        "discriminator; choose one of b16, b8, b4.conv, b4.fc"):
        fit_encoder(options(setup, tmp_path / "x", feature_layer="b64"))
    with pytest.raises(UserError, match="give either --kimg or --iters, not both"):
        fit_encoder(options(setup, tmp_path / "x", kimg=1.0))
    big = tmp_path / "big"
    write_folder(big, sample_images(tiny_networks(32)[0], 2, seed=0))
    with pytest.raises(UserError, match="has 32 px images with 3 channels but --network"):
        fit_encoder(options(setup, tmp_path / "x", data=str(big)))
    fit_encoder(options(setup, tmp_path / "done", iters=1), echo=quiet)
    with pytest.raises(UserError, match="already holds encoder checkpoints; pass --resume latest"):
        fit_encoder(options(setup, tmp_path / "done", iters=2))
    with pytest.raises(UserError, match="--resume latest found no encoder checkpoint"):
        fit_encoder(options(setup, tmp_path / "fresh", resume="latest"))


def test_cli_dry_run_and_a_short_run(setup, tmp_path):
    runner = CliRunner()
    base = ["train-encoder", "--network", setup["network"], "--data", setup["data"],
            "--outdir", str(tmp_path / "cli"), "--batch", "16", "--device", "cpu",
            "--workers", "0", "--cbase", "256", "--cmax", "32"]
    result = runner.invoke(main, base + ["--kimg", "1", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["total_iters"] == math.ceil(1000 / 16) == 63
    assert json.loads(result.output)["snap"] is None  # sized from the run: 63 // 6 = 10
    assert not (tmp_path / "cli").exists()
    result = runner.invoke(main, base + ["--iters", "2", "--tick", "1", "--snap", "0"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "encoder-000002.safetensors" in result.output
    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert names == ["encoder-000002.safetensors", "encoder-000002.state.pt",
                     "encoder_options.json", "log.txt", "rec000002.png", "stats.jsonl"]
    result = runner.invoke(main, base + ["--iters", "2", "--kimg", "1"])
    assert result.exit_code == 1 and "give either --kimg or --iters, not both" in result.output
    write_folder(tmp_path / "val", setup["heldout"][:4])
    result = runner.invoke(main, base + ["--iters", "4", "--snap", "1", "--resume", "latest",
                                         "--val", str(tmp_path / "val")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    best = json.loads((tmp_path / "cli" / "validation.json").read_text())["best"]["checkpoint"]
    assert f"chosen on validation loss: {tmp_path / 'cli' / best}" in result.output


def test_scale_augmentation_rescales_about_the_centre():
    # a ramp along x (and one along y) through the centre: a zoom by s about the centre reads
    # the input at u / s, so bilinear sampling inside the frame gives exactly ramp / s there
    torch.manual_seed(0)
    n, size = 400, 32
    u = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) / size  # pixel centres
    x = torch.stack([u.expand(size, size), u[:, None].expand(size, size)])  # [2, H, W]
    x = x.expand(n, 2, size, size).clone()
    assert torch.equal(fit_mod.scale_augmentation(0.0)(x), x)
    y = fit_mod.scale_augmentation(1.0)(x)
    inner = slice(size // 2 - 3, size // 2 + 3)  # within the frame for every s above 0.5
    ratio_x = y[:, 0, inner, inner] / x[:, 0, inner, inner]
    ratio_y = y[:, 1, inner, inner] / x[:, 1, inner, inner]
    per_image = ratio_x.mean(dim=(1, 2))  # 1 / s
    assert torch.allclose(ratio_x, per_image[:, None, None].expand_as(ratio_x), atol=1e-6)
    assert torch.allclose(ratio_y, ratio_x, atol=1e-6)  # isotropic
    log2_s = -torch.log2(per_image)
    assert abs(float(log2_s.mean())) < 0.03 and abs(float(log2_s.std()) - 0.2) < 0.02
    half = fit_mod.scale_augmentation(0.5)(x)
    kept = (half == x).flatten(1).all(dim=1).double().mean()
    assert 0.4 < float(kept) < 0.6


def test_scale_aug_trains_and_is_recorded(setup, tmp_path):
    fit_encoder(options(setup, tmp_path / "aug", scale_aug=0.5), echo=quiet)
    recorded = json.loads((tmp_path / "aug" / "encoder_options.json").read_text())
    assert recorded["options"]["scale_aug"] == 0.5
    assert all(math.isfinite(r["loss"]) for r in stats(tmp_path / "aug"))
    result = CliRunner().invoke(main, ["train-encoder", "--network", setup["network"],
                                       "--data", setup["data"], "--outdir", str(tmp_path / "x"),
                                       "--scale-aug", "1.5", "--dry-run"])
    assert result.exit_code == 2 and "--scale-aug" in result.output


# ------------------------------------------------------------------ checkpoint choice (--val)


def _val_folder(setup, folder, *, with_anomalies: bool = False):
    """The held-out samples as a validation folder; with anomalies, white images labelled 1
    are added (dataset.json labels), which the validation loss must never look at."""
    images = setup["heldout"][:24]
    names = write_folder(folder, images)
    if with_anomalies:
        white = np.full_like(images[:8], 255)
        odd = write_folder(folder, white, prefix="odd")
        labels = [[n, 0] for n in names] + [[n, 1] for n in odd]
        (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder


def _izif_of(setup, encoder_path, images_nhwc) -> float:
    """Mean izif score (anomaly.methods.scores.izif_score, kappa 1, b8) of images: the reference."""
    from anomaly.model.ano_model import discriminator_features

    E, _ = load_encoder(encoder_path)
    G, D = setup["G"], setup["D"]
    x = as_float(images_nhwc)
    with torch.no_grad():
        rec = G.synthesis(E(x), noise_mode="const")
        scores = izif_score(x, rec, discriminator_features(D, x, "b8"),
                            discriminator_features(D, rec, "b8"), kappa=1.0)
    return float(scores.mean())


def test_validation_loss_names_the_best_checkpoint(setup, tmp_path):
    from anomaly.model.encoder_io import best_encoder

    val = _val_folder(setup, tmp_path / "val", with_anomalies=True)
    out = tmp_path / "run"
    fit_encoder(options(setup, out, iters=30, snap=10, val=str(val)), echo=quiet)
    body = json.loads((out / "validation.json").read_text())
    assert body["images"] == 24  # the 24 normals; the 8 white 'anomalies' are left out
    assert [r["iter"] for r in body["checkpoints"]] == [10, 20, 30]
    for record in body["checkpoints"]:  # each equals an independent izif of its checkpoint
        want = _izif_of(setup, out / record["checkpoint"], setup["heldout"][:24])
        assert record["loss"] == pytest.approx(want, rel=1e-4)
        assert record["loss"] == pytest.approx(record["image_loss"] + record["feature_loss"])
    best = min(body["checkpoints"], key=lambda r: r["loss"])
    assert body["best"] == best
    assert best_encoder(out) == out / best["checkpoint"]
    _, extra = load_encoder(out / "encoder-000020.safetensors")
    assert extra["validation"]["loss"] == body["checkpoints"][1]["loss"]
    assert f"best {best['checkpoint']}" in (out / "log.txt").read_text()
    assert best_encoder(tmp_path) is None  # no validation.json: no choice


def test_best_record_is_the_earliest_on_ties():
    assert fit_mod.best_record([{"iter": 20, "loss": 1.0}, {"iter": 10, "loss": 1.0},
                                {"iter": 30, "loss": 2.0}])["iter"] == 10


def test_validation_history_continues_on_resume(setup, tmp_path):
    val = _val_folder(setup, tmp_path / "val")
    fit_encoder(options(setup, tmp_path / "a", iters=8, snap=4, val=str(val)), echo=quiet)
    fit_encoder(options(setup, tmp_path / "b", iters=4, snap=4, val=str(val)), echo=quiet)
    fit_encoder(options(setup, tmp_path / "b", iters=8, snap=4, val=str(val), resume="latest"),
                echo=quiet)
    a = json.loads((tmp_path / "a" / "validation.json").read_text())
    b = json.loads((tmp_path / "b" / "validation.json").read_text())
    assert a["checkpoints"] == b["checkpoints"] and len(a["checkpoints"]) == 2
    # The run's records name their inputs relative to the run's folder: no absolute folders.
    info = json.loads((tmp_path / "b" / "encoder_options.json").read_text())
    assert b["data"] == "../val" == info["options"]["val"]
    assert info["options"]["outdir"] == "." and info["resumed_from"] == "encoder-000004.safetensors"
    assert str(tmp_path) not in json.dumps(info) + json.dumps(b)


def test_validation_data_refusals(setup, tmp_path):
    with pytest.raises(UserError, match="is the training data"):
        fit_encoder(options(setup, tmp_path / "r1", val=setup["data"]))
    with pytest.raises(UserError, match="does not exist"):
        fit_encoder(options(setup, tmp_path / "r2", val=str(tmp_path / "nope.zip")))
    small = tmp_path / "small"
    write_folder(small, np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="8 px images"):
        fit_encoder(options(setup, tmp_path / "r3", val=str(small)))
    only_anomalies = tmp_path / "odd"
    names = write_folder(only_anomalies, setup["heldout"][:2])
    (only_anomalies / "dataset.json").write_text(json.dumps({"labels": [[n, 1] for n in names]}))
    with pytest.raises(UserError, match="no normal images"):
        fit_encoder(options(setup, tmp_path / "r4", val=str(only_anomalies)))


def test_checkpoints_trained_without_val_are_validated_afterwards(setup, tmp_path):
    from anomaly.model.encoder_io import best_encoder

    val = _val_folder(setup, tmp_path / "val")
    out = tmp_path / "run"
    fit_encoder(options(setup, out, iters=8, snap=4), echo=quiet)  # no --val
    assert best_encoder(out) is None
    fit_encoder(options(setup, out, iters=8, snap=4, val=str(val), resume="latest"), echo=quiet)
    body = json.loads((out / "validation.json").read_text())
    assert [r["iter"] for r in body["checkpoints"]] == [4, 8]
    for record in body["checkpoints"]:
        want = _izif_of(setup, out / record["checkpoint"], setup["heldout"][:24])
        assert record["loss"] == pytest.approx(want, rel=1e-4)
    assert best_encoder(out) == out / body["best"]["checkpoint"]


def test_snap_default_is_sized_from_the_run(setup, tmp_path):
    """A short run gets several checkpoints for --val to choose from; a long one every 1000."""
    short = options(setup, tmp_path / "s", kimg=2.0, iters=None, batch=16, snap=None)  # 125 its
    assert short.snap is None and short.snap_iters() == 125 // 6 == 20
    assert options(setup, tmp_path / "l", kimg=200.0, iters=None, batch=16,
                   snap=None).snap_iters() == 1000
    assert options(setup, tmp_path / "e", iters=3, snap=0).snap_iters() == 0


def test_init_warm_starts_a_new_run_and_max_minutes_stops_it(setup, tmp_path):
    """--init copies an encoder's weights into a new run at iteration 0 with a fresh
    optimizer; --max-minutes stops the run early with a checkpoint; --init with --resume is
    refused."""
    first = fit_encoder(options(setup, tmp_path / "a", iters=2, snap=0), echo=quiet)
    E0, _ = load_encoder(first)
    run = fit_encoder(options(setup, tmp_path / "b", iters=50, snap=0, init=str(first),
                              max_minutes=1e-9), echo=quiet)
    assert run.name == "encoder-000001.safetensors"  # stopped after the first iteration
    info = json.loads((tmp_path / "b" / "encoder_options.json").read_text())
    assert info["start_iter"] == 0
    assert info["options"]["init"] == "../a/encoder-000002.safetensors"  # relative to its folder
    E1, _ = load_encoder(run)
    moved = [float((a - b).abs().max()) for a, b in zip(E0.parameters(), E1.parameters())]
    assert 0 < max(moved) < 0.1  # one Adam step away from the --init weights, not a new net
    with pytest.raises(UserError, match="either --init"):
        fit_encoder(options(setup, tmp_path / "c", iters=2, init=str(first), resume="latest"))
    with pytest.raises(UserError, match="--init .* does not exist"):
        fit_encoder(options(setup, tmp_path / "d", iters=2, init=str(tmp_path / "none")))
