"""Training loop: run folder, resume, crash safety, divergence, several processes (tiny nets)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from anomaly.cli import main
from stylegan import train as train_mod
from stylegan.checkpoint import load_network
from stylegan.errors import UserError
from stylegan.options import TrainFlags, resolve
from stylegan.train import find_latest_snapshot, train


def make_zip(path: Path, n: int = 24, res: int = 16) -> Path:
    """A tiny NVlabs-style dataset: coloured discs on a skin-toned background."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:res, :res]
    labels = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            img = np.zeros((res, res, 3), np.uint8) + np.array([200, 150, 120], np.uint8)
            cy, cx, r = rng.uniform(res * 0.3, res * 0.7, 2).tolist() + [rng.uniform(2, res / 3)]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.randint(40, 120, 3)
            buf = BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            name = f"img{i:05d}.png"
            zf.writestr(name, buf.getvalue())
            labels.append([name, 0])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def tiny_flags(tmp_path: Path, **over) -> TrainFlags:
    data = tmp_path / "train.zip"
    if not data.exists():
        make_zip(data)
    base = dict(outdir=str(tmp_path / "runs"), data=str(data), cfg="cpu", batch=4, cbase=128,
                cmax=16, map_depth=2, kimg=0.032, tick=0.008, snap=2, workers=0, device="cpu",
                gamma=0.1)
    base.update(over)
    return TrainFlags(**base)


def test_dry_run_prints_resolved_options_with_overrides(tmp_path):
    make_zip(tmp_path / "train.zip")
    result = CliRunner().invoke(main, [
        "train-gan", f"--outdir={tmp_path / 'runs'}", "--cfg=stylegan2",
        f"--data={tmp_path / 'train.zip'}", "--gpus=1", "--batch=16", "--gamma=0.8192",
        "--map-depth=2", "--glr=0.0025", "--dlr=0.0025", "--cbase=16384", "--kimg=50",
        "--snap=5", "--workers=2", "--mirror=1", "--dry-run"])
    assert result.exit_code == 0, result.output
    opts = json.loads(result.output)
    assert opts["batch"] == 16 and opts["gamma"] == 0.8192 and opts["mirror"] is True
    assert opts["generator"]["mapping_layers"] == 2  # flag beats the preset's 8
    assert opts["generator"]["channel_base"] == 16384 and opts["generator"]["img_resolution"] == 16
    assert opts["glr"] == 0.0025 and opts["kimg"] == 50 and opts["snap"] == 5
    assert opts["ema_kimg"] == pytest.approx(16 * 10 / 32)  # stylegan2: ema from the batch
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_bad_flags_end_in_one_sentence(tmp_path):
    make_zip(tmp_path / "train.zip")
    r = CliRunner().invoke(main, ["train-gan", "--outdir", str(tmp_path), "--data",
                                  str(tmp_path / "train.zip"), "--batch", "6", "--gpus", "4", "-n"])
    assert r.exit_code != 0 and "multiple of" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train-gan", "--outdir", str(tmp_path), "--data",
                                  str(tmp_path / "train.zip"), "--resume", "latest", "-n"])
    assert r.exit_code != 0 and "found no snapshot" in r.output


@pytest.mark.slow
def test_training_run_folder_and_resume_continues(tmp_path):
    run_dir = train(resolve(tiny_flags(tmp_path)).options)
    names = {p.name for p in run_dir.iterdir()}
    assert {"training_options.json", "log.txt", "stats.jsonl", "reals.png",
            "fakes000000.png"} <= names
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 4 and stats[-1]["kimg"] == pytest.approx(0.032)
    for rec in stats:
        assert np.isfinite([rec["loss_G"], rec["loss_D"]]).all()
        assert rec["sec_per_kimg"] > 0 and rec["peak_rss_mb"] > 0
    assert 0.0 <= stats[-1]["augment_p"] <= 1.0
    snaps = sorted(run_dir.glob("network-snapshot-*.safetensors"))
    assert len(snaps) == 2  # after ticks 2 and 4
    latest = find_latest_snapshot(tmp_path / "runs")
    first = load_network(latest)
    # Resume: the kimg counter, ADA p and pl_mean continue from the snapshot.
    saved_p = first["meta"]["extra"]["augment_p"]
    resolved = resolve(tiny_flags(tmp_path, resume="latest", kimg=0.048))
    run2 = train(resolved.options, resume_networks=resolved.resume_networks)
    stats2 = [json.loads(line) for line in (run2 / "stats.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in stats2] == pytest.approx([0.04, 0.048])
    assert abs(stats2[0]["augment_p"] - saved_p) <= 2 * 4 * 4 / 500_000 + 1e-9
    assert stats2[0]["pl_mean"] != 0.0


def test_resume_adopts_file_architecture_or_refuses(tmp_path):
    from stylegan.checkpoint import save_networks
    from stylegan.networks import Discriminator, Generator

    opts = resolve(tiny_flags(tmp_path, map_depth=3)).options
    ckpt = tmp_path / "three.safetensors"
    save_networks(ckpt, G=Generator(opts.generator), D=Discriminator(opts.discriminator),
                  G_ema=Generator(opts.generator))
    resolved = resolve(tiny_flags(tmp_path, map_depth=2, resume=str(ckpt)))
    assert resolved.options.generator.mapping_layers == 3
    assert any("mapping_layers: 2 -> 3" in n and "--map-depth" in n for n in resolved.overridden)
    with pytest.raises(UserError, match="strict-resume"):
        resolve(tiny_flags(tmp_path, map_depth=2, resume=str(ckpt), strict_resume=True))
    with pytest.raises(UserError, match="resolution"):
        other = tmp_path / "other"
        other.mkdir()
        make_zip(other / "train.zip", res=32)
        resolve(tiny_flags(tmp_path, data=str(other / "train.zip"), resume=str(ckpt)))


def test_nan_loss_stops_with_clear_message_and_keeps_snapshot(tmp_path, monkeypatch):
    run_dir = train(resolve(tiny_flags(tmp_path, kimg=0.016, snap=2)).options)
    good = sorted(run_dir.glob("network-snapshot-*.safetensors"))
    assert good
    monkeypatch.setattr(train_mod.losses, "g_nonsaturating_loss",
                        lambda logits: (logits * float("nan")).mean())
    with pytest.raises(train_mod.TrainingDiverged, match="last good snapshot"):
        train(resolve(tiny_flags(tmp_path, kimg=0.016)).options)
    load_network(good[-1])  # still loads


@pytest.mark.slow
def test_sigkill_never_leaves_a_corrupt_snapshot(tmp_path):
    flags = tiny_flags(tmp_path, kimg=10, snap=1, tick=0.004)
    code = ("import sys; from stylegan.options import TrainFlags, run_from_flags; "
            f"run_from_flags(TrainFlags(**{flags.__dict__!r}))")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for delay in (6.0, 7.3):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "runs").glob("*/*.safetensors")):
            time.sleep(0.2)
        time.sleep(delay - 6.0 + 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    snaps = list((tmp_path / "runs").glob("*/network-snapshot-*.safetensors"))
    assert snaps
    for snap in snaps:  # every file that carries a final name is complete
        load_network(snap)
    latest = find_latest_snapshot(tmp_path / "runs")
    resolved = resolve(TrainFlags(**{**flags.__dict__, "resume": "latest", "kimg": 0.001}))
    assert resolved.options.resume == str(latest)
    kimg_before = load_network(latest)["meta"]["extra"]["cur_nimg"]
    run = train(resolved.options, resume_networks=resolved.resume_networks)
    assert "done" in (run / "log.txt").read_text() and kimg_before >= 4


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_replicas(tmp_path):
    opts = resolve(tiny_flags(tmp_path, gpus=2, kimg=0.024, tick=0.008, snap=1)).options
    run_dir = train(opts)
    log = (run_dir / "log.txt").read_text()
    assert log.count("replicas identical") == 3
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in stats] == pytest.approx([0.008, 0.016, 0.024])
    load_network(sorted(run_dir.glob("network-snapshot-*.safetensors"))[-1])


def test_replica_check_detects_a_difference():
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    assert train_mod.replica_fingerprint(a).shape == (1,)
    assert not torch.equal(train_mod.replica_fingerprint(a), train_mod.replica_fingerprint(b))
    b.load_state_dict(a.state_dict())
    assert torch.equal(train_mod.replica_fingerprint(a), train_mod.replica_fingerprint(b))


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    make_zip(tmp_path / "train.zip")
    torchrun = Path(sys.executable).parent / "torchrun"
    anostyle = Path(sys.executable).parent / "anostyle"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(anostyle), "train-gan",
         "--outdir", str(tmp_path / "runs"), "--data", str(tmp_path / "train.zip"), "--cfg", "cpu",
         "--batch", "4", "--cbase", "128", "--cmax", "16", "--kimg", "0.008", "--tick", "0.004",
         "--snap", "1", "--workers", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "runs").iterdir())
    options = json.loads((run_dir / "training_options.json").read_text())
    assert options["gpus"] == 2 and options["batch_gpu"] == 2
    assert (run_dir / "log.txt").read_text().count("replicas identical across 2") == 2


def _one_iteration(tmp_path: Path, **over) -> train_mod.TrainingStep:
    opts = resolve(tiny_flags(tmp_path, **over)).options
    torch.manual_seed(0)
    step = train_mod.TrainingStep(opts)
    step(batch_idx=0)  # every phase: Gmain, path length, Dmain, R1
    return step


def test_training_step_without_idle_weight_gradients_equals_the_plain_loop(tmp_path,
                                                                           monkeypatch):
    """Switching off the other network's weight gradients per phase changes no number, and
    frozen D layers stay frozen."""
    fast = _one_iteration(tmp_path, freezed=1)
    monkeypatch.setattr(train_mod, "_no_weight_grads", lambda opt: contextlib.nullcontext())
    plain = _one_iteration(tmp_path, freezed=1)
    assert fast.state.cur_nimg == plain.state.cur_nimg == 4
    for name in ("G", "D", "G_ema"):
        a, b = getattr(fast.state, name).state_dict(), getattr(plain.state, name).state_dict()
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.allclose(value, b[key], rtol=1e-5, atol=1e-6), (name, key)
    frozen = fast.state.D.freezable_layers()[0]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for layer in fast.state.D.freezable_layers()[1:]
               for p in layer.parameters())
    assert all(p.requires_grad for p in fast.state.G.parameters())


def test_no_weight_grads_leaves_only_the_active_network_with_gradients(tmp_path):
    step = _one_iteration(tmp_path)
    G, D = step.state.G, step.state.D
    G.zero_grad(set_to_none=True), D.zero_grad(set_to_none=True)
    with train_mod._no_weight_grads(step.state.opt_D):
        z = torch.randn(2, G.z_dim)
        D(G(z, None)).sum().backward()
    assert all(p.grad is None for p in D.parameters())
    assert G.synthesis.b16.conv1.weight.grad is not None
    assert all(p.requires_grad for p in D.parameters())


def test_max_minutes_stops_with_a_snapshot(tmp_path):
    """--max-minutes ends the run after the iteration that crosses it, with a final snapshot,
    long before --kimg (here 0.004 kimg of 1)."""
    run_dir = train(resolve(tiny_flags(tmp_path, kimg=1.0, snap=0, max_minutes=1e-9)).options)
    snaps = sorted(run_dir.glob("network-snapshot-*.safetensors"))
    assert [p.name for p in snaps] == ["network-snapshot-000000.004.safetensors"]
    log = (run_dir / "log.txt").read_text()
    assert "--max-minutes 1e-09 reached" in log and "done: 0.004 kimg" in log
