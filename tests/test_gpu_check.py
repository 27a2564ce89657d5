"""bench/gpu_check.py: its checks run on the CPU with tiny networks (float16 forced on the CPU,
gloo instead of NCCL), and without CUDA the script prints one JSON line and exits 0."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check as gc
from stylegan import networks as nw
from stylegan import train as train_mod

CPU = torch.device("cpu")
TINY_TRAIN = dict(cfg="paper256", batch=4, mbstd_group=4, cbase=256, cmax=16, map_depth=2)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fp16_on_cpu_is_forced_only_inside_the_block():
    G = nw.Generator(nw.GeneratorConfig(z_dim=8, w_dim=8, img_resolution=16, channel_base=64,
                                        channel_max=16, num_fp16_res=2, conv_clamp=256,
                                        mapping_layers=1))
    z = torch.randn(2, 8)
    with torch.no_grad():
        plain = G(z, None)
        assert torch.equal(plain, G(z, None, force_fp32=True))  # CPU: float32 by default
        with nw.float16_on_any_device():
            half = G(z, None)
        assert torch.equal(plain, G(z, None))  # the switch is off again
    assert not torch.equal(half, plain)
    assert gc._relative_error(half, plain) < 0.02


def test_fp16_vs_fp32_check_on_cpu():
    report = gc.check_fp16_vs_fp32(CPU, resolution=32, channel_base=256, channel_max=32,
                                   batch=2)
    errors = {k: v for k, v in report.items() if k.endswith("relative_error")}
    assert set(errors) == {"G_inference_relative_error", "G_training_relative_error",
                           "D_logits_relative_error", "D_features_max_relative_error"}
    # float16 rounds: a real but small difference (half of 2^-10 per operation, accumulated)
    assert all(1e-5 < e < gc.FP16_MAX_RELATIVE_ERROR for e in errors.values()), errors
    assert report["ok"] is True


def test_relative_error_and_peaks_helpers():
    assert gc._relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == \
        pytest.approx(4 / 3)
    report = {"a": {"peak_memory_mib": 5.0, "b": {"peak_memory_mib": 7.5}},
              "c": {"peak_memory_mib": None}}
    assert sorted(gc._peaks(report)) == [5.0, 7.5]


def test_mixed_precision_steps_on_cpu(tmp_path):
    report = gc.check_mixed_precision_steps(CPU, tmp_path, resolution=16, steps=2,
                                            flags=TINY_TRAIN)
    assert report["ok"] is True and report["num_fp16_res"] == 4 and report["conv_clamp"] == 256
    assert set(report["losses"]) == {"G", "Gpl", "D", "Dr1"}
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v)
               for v in report["losses"].values())


def test_mixed_precision_really_computes_float16_on_cpu(tmp_path, monkeypatch):
    seen = []
    original = nw._compute_dtype

    def spy(use_fp16, force_fp32, device):
        seen.append(original(use_fp16, force_fp32, device))
        return seen[-1]

    monkeypatch.setattr(nw, "_compute_dtype", spy)
    gc.check_mixed_precision_steps(CPU, tmp_path, resolution=16, steps=1, flags=TINY_TRAIN)
    assert torch.float16 in seen and torch.float32 in seen


def test_training_speed_check_on_cpu(tmp_path):
    cases = {"tiny": (16, TINY_TRAIN)}
    report = gc.check_training_speed(CPU, tmp_path, cases=cases, repeats=1)
    tiny = report["tiny"]
    assert report["ok"] is True and tiny["batch"] == 4 and tiny["peak_memory_mib"] is None
    assert tiny["sec_per_kimg"] == pytest.approx(1000 / tiny["images_per_second"], rel=0.02)


def test_run_checks_records_errors_and_goes_on():
    def broken():
        raise RuntimeError("boom")

    results = gc.run_checks({"bad": broken, "good": lambda: {"ok": True}}, device=CPU)
    assert results["bad"]["ok"] is False and "RuntimeError: boom" in results["bad"]["error"]
    assert results["good"]["ok"] is True and "seconds" in results["good"]


def test_cuda_backend_settings_only_touch_cuda():
    before = gc.cuda_settings()
    train_mod.cuda_backend_settings(CPU)
    assert gc.cuda_settings() == before
    try:
        train_mod.cuda_backend_settings(torch.device("cuda"))  # sets flags; needs no GPU
        assert gc.cuda_settings() == {"cudnn_benchmark": True, "cudnn_allow_tf32": False,
                                      "matmul_allow_tf32": False}
    finally:
        torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
        torch.backends.cudnn.allow_tf32 = before["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = before["matmul_allow_tf32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_without_cuda_prints_one_json_line_and_exits_0():
    script = Path(gc.__file__)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["gpu_check"] == "skipped"


@pytest.mark.slow
def test_torchrun_check_with_gloo_on_cpu(tmp_path):
    report = gc.check_torchrun(CPU, tmp_path, nproc=1, resolution=16,
                               flags=("--cfg", "cpu", "--batch", "4", "--cbase", "128",
                                      "--cmax", "16", "--kimg", "0.008", "--tick", "0.004",
                                      "--snap", "1"))
    assert report["ok"] is True, report
    assert report["backend"] == "gloo" and report["all_reduce_ok"] and report["kimg"] == 0.008


@pytest.mark.slow
def test_encoder_and_scoring_check_on_cpu(tmp_path):
    report = gc.check_encoder_and_scoring(CPU, tmp_path, resolution=16, images=16, iters=2,
                                          channel_base=128, channel_max=16)
    assert report["ok"] is True
    assert report["train_encoder"]["images_per_second"] > 0
    assert report["score"]["images_per_second"] > 0 and report["score"]["images"] == 16


@pytest.mark.slow
def test_torchrun_check_with_two_gloo_processes(tmp_path):
    report = gc.check_torchrun(CPU, tmp_path, nproc=2, resolution=16,
                               flags=("--cfg", "cpu", "--batch", "4", "--cbase", "128",
                                      "--cmax", "16", "--kimg", "0.008", "--tick", "0.004",
                                      "--snap", "1"))
    assert report["ok"] is True, report
    assert report["nproc"] == 2 and report["all_reduce_ok"] and report["kimg"] == 0.008
