"""stylegan/ops.py against hand-derived numbers (FIR filters, resampling, modulation, mbstd)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from stylegan import ops

F4 = ops.setup_filter([1, 3, 3, 1])
# 1-D response of upsample2d (taps [1,3,3,1] / 8, gain 2 per axis) and of downsample2d.
UP_TAPS = torch.tensor([0.25, 0.75, 0.75, 0.25])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP barriers stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_setup_filter_is_normalised_outer_product():
    assert F4.shape == (4, 4)
    assert F4.sum().item() == pytest.approx(1.0)
    assert F4[0, 0].item() == pytest.approx(1 / 64)
    assert F4[1, 2].item() == pytest.approx(9 / 64)
    assert torch.equal(F4, F4.T)


def test_bias_act_order_and_gains():
    x = torch.tensor([[-1.0, 2.0]])
    b = torch.tensor([0.5, -3.0])
    # x + b = [-0.5, -1.0] -> lrelu -> [-0.1, -0.2] -> * sqrt(2)
    out = ops.bias_act(x, b, act="lrelu")
    assert torch.allclose(out, torch.tensor([[-0.1, -0.2]]) * math.sqrt(2))
    # extra gain multiplies after the activation; clamp comes last
    out = ops.bias_act(torch.tensor([[10.0, -0.5]]), None, act="linear", gain=3.0, clamp=4.0)
    assert torch.allclose(out, torch.tensor([[4.0, -1.5]]))
    with pytest.raises(ValueError):
        ops.bias_act(x, None, act="swish")


def test_normalize_2nd_moment():
    out = ops.normalize_2nd_moment(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(out, torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5))
    assert torch.allclose(out.square().mean(), torch.tensor(1.0))


def test_upsample2d_of_constant_is_constant_inside():
    out = ops.upsample2d(torch.ones(1, 2, 4, 4), F4)
    assert out.shape == (1, 2, 8, 8)
    assert torch.allclose(out[:, :, 1:-1, 1:-1], torch.ones(1, 2, 6, 6))
    # borders see one zero-padded tap: 0.75 per axis
    assert out[0, 0, 0, 3].item() == pytest.approx(0.75)
    assert out[0, 0, 7, 3].item() == pytest.approx(0.75)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.75**2)


def test_upsample2d_of_delta_places_the_filter_times_4():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1
    out = ops.upsample2d(x, F4)[0, 0]
    line = torch.zeros(8)
    line[1:5] = UP_TAPS  # input sample 1 -> output samples 1..4
    assert torch.allclose(out, torch.outer(line, line))
    assert out.sum().item() == pytest.approx(4.0)


def test_downsample2d_of_constant_and_delta():
    out = ops.downsample2d(torch.ones(1, 1, 8, 8), F4)[0, 0]
    assert out.shape == (4, 4)
    line = torch.tensor([7 / 8, 1, 1, 7 / 8])
    assert torch.allclose(out, torch.outer(line, line))
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = 1
    out = ops.downsample2d(x, F4)[0, 0]
    # padded index 3 is seen by outputs 0 (tap 3) and 1 (tap 1): [1/8, 3/8, 0, 0]
    line = torch.tensor([1 / 8, 3 / 8, 0, 0])
    assert torch.allclose(out, torch.outer(line, line))


def test_fir_filter2d_sizes_and_gain():
    x = torch.ones(2, 3, 5, 5)
    assert ops.fir_filter2d(x, F4).shape == (2, 3, 2, 2)
    assert ops.fir_filter2d(x, F4, padding=(2, 2, 2, 2)).shape == (2, 3, 6, 6)
    out = ops.fir_filter2d(x, F4, padding=(1, 1, 1, 1), gain=4.0, down=2)
    assert out.shape == (2, 3, 2, 2)
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0)


def _tap_kernel(row: int, col: int, channels: int = 1) -> torch.Tensor:
    w = torch.zeros(channels, channels, 3, 3)
    for ch in range(channels):
        w[ch, ch, row, col] = 1
    return w


@pytest.mark.parametrize(("up", "down", "k", "size"), [
    (1, 1, 3, 8), (2, 1, 3, 16), (2, 1, 1, 16), (1, 2, 3, 4), (1, 2, 1, 4),
])
def test_conv2d_resample_output_sizes(up, down, k, size):
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(5, 3, k, k)
    out = ops.conv2d_resample(x, w, F4, up=up, down=down, padding=k // 2)
    assert out.shape == (2, 5, size, size)


def test_conv_up1_is_cross_correlation():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 2, 2] = 1
    out = ops.conv2d_resample(x, _tap_kernel(1, 2), padding=1)[0, 0]
    # out[i, j] = x[i, j + 1]: the delta appears one column to the left
    expected = torch.zeros(4, 4)
    expected[2, 1] = 1
    assert torch.equal(out, expected)


def test_conv_up2_center_tap_equals_upsample2d_and_kernel_direction():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1
    center = ops.conv2d_resample(x, _tap_kernel(1, 1), F4, up=2, padding=1)[0, 0]
    assert torch.allclose(center, ops.upsample2d(x, F4)[0, 0])
    # Transposed conv with the stored weight (no flip): the right tap moves the response RIGHT.
    right = ops.conv2d_resample(x, _tap_kernel(1, 2), F4, up=2, padding=1)[0, 0]
    rows, cols = torch.zeros(8), torch.zeros(8)
    rows[1:5] = UP_TAPS
    cols[2:6] = UP_TAPS
    assert torch.allclose(right, torch.outer(rows, cols))


def test_conv_down2_center_tap_equals_downsample2d_and_kernel_direction():
    x = torch.randn(1, 2, 8, 8)
    center = ops.conv2d_resample(x, _tap_kernel(1, 1, 2), F4, down=2, padding=1)
    assert torch.allclose(center, ops.downsample2d(x, F4), atol=1e-6)
    # Cross-correlation: the right tap reads the filtered image one sample to the right.
    right = ops.conv2d_resample(x, _tap_kernel(1, 2, 2), F4, down=2, padding=1)
    filtered = ops.fir_filter2d(x, F4, padding=(1, 2, 1, 2))  # [1, 2, 8, 8]
    assert torch.allclose(right, filtered[:, :, ::2, 1::2], atol=1e-6)
    assert not torch.allclose(right, center, atol=1e-3)


def test_conv_1x1_down_and_up_paths():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 1, 1)
    down = ops.conv2d_resample(x, w, F4, down=2)
    assert torch.allclose(down, torch.nn.functional.conv2d(ops.downsample2d(x, F4), w), atol=1e-5)
    up = ops.conv2d_resample(x, w, F4, up=2)
    assert torch.allclose(up, ops.upsample2d(torch.nn.functional.conv2d(x, w), F4), atol=1e-5)


def test_grouped_up2_matches_per_sample_convs():
    x = torch.randn(3, 2, 4, 4)
    w = torch.randn(3 * 5, 2, 3, 3)
    grouped = ops.conv2d_resample(x.reshape(1, 6, 4, 4), w, F4, up=2, padding=1, groups=3)
    grouped = grouped.reshape(3, 5, 8, 8)
    for i in range(3):
        single = ops.conv2d_resample(x[i:i + 1], w[5 * i:5 * i + 5], F4, up=2, padding=1)
        assert torch.allclose(grouped[i], single[0], atol=1e-5)


def test_modulated_conv_hand_values():
    x = torch.ones(1, 2, 1, 1)
    weight = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)
    styles = torch.ones(1, 2)
    # demodulated: (3 + 4) / ||[3, 4]|| = 1.4
    out = ops.modulated_conv2d(x, weight, styles)
    assert out.item() == pytest.approx(1.4)
    # without demodulation: styles [2, 0.5] -> 3 * 2 + 4 * 0.5 = 8
    out = ops.modulated_conv2d(x, weight, torch.tensor([[2.0, 0.5]]), demodulate=False)
    assert out.item() == pytest.approx(8.0)
    # noise is added after demodulation
    out = ops.modulated_conv2d(x, weight, styles, noise=torch.full([1, 1, 1, 1], 0.25))
    assert out.item() == pytest.approx(1.65)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_fused_equals_non_fused(up, demodulate):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    weight = torch.randn(5, 4, 3, 3)
    styles = torch.randn(3, 4) + 1
    noise = torch.randn(3, 1, 8 * up, 8 * up)
    kwargs = dict(noise=noise, up=up, padding=1, resample_filter=F4, demodulate=demodulate)
    fused = ops.modulated_conv2d(x, weight, styles, fused=True, **kwargs)
    plain = ops.modulated_conv2d(x, weight, styles, fused=False, **kwargs)
    assert fused.shape == (3, 5, 8 * up, 8 * up)
    assert torch.allclose(fused, plain, atol=1e-5 * plain.abs().max().item())


def test_demodulation_ignores_style_scale():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6)
    weight = torch.randn(3, 4, 3, 3)
    styles = torch.randn(2, 4)
    base = ops.modulated_conv2d(x, weight, styles, padding=1)
    scaled = ops.modulated_conv2d(x, weight, styles * 7, padding=1)
    assert torch.allclose(base, scaled, atol=1e-5)
    undemod = ops.modulated_conv2d(x, weight, styles * 7, padding=1, demodulate=False)
    assert torch.allclose(undemod, 7 * ops.modulated_conv2d(x, weight, styles, padding=1,
                                                            demodulate=False), atol=1e-4)


def test_minibatch_std_hand_values():
    # N=4, group 2: sample i is in group i % 2 -> groups {0, 2} and {1, 3}
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 6.0], [0.0, 4.0]]).reshape(4, 2, 1, 1)
    out = ops.minibatch_std(x, group_size=2, num_channels=1)
    assert out.shape == (4, 3, 1, 1)
    assert torch.equal(out[:, :2], x)
    # group {0, 2}: stds [1, 2] -> 1.5; group {1, 3}: stds [sqrt(1e-8), 2] -> 1.00005
    expected = torch.tensor([1.5, (1e-4 + 2) / 2, 1.5, (1e-4 + 2) / 2])
    assert torch.allclose(out[:, 2, 0, 0], expected, atol=1e-6)


def test_minibatch_std_channel_groups_and_sizes():
    x = torch.randn(6, 4, 3, 3)
    out = ops.minibatch_std(x, group_size=None, num_channels=2)
    assert out.shape == (6, 6, 3, 3)
    expected = x.std(dim=0, unbiased=False).reshape(2, 2, 3, 3).mean(dim=[1, 2, 3])  # [F]
    assert torch.allclose(out[0, 4:, 0, 0], expected, atol=1e-5)
    assert torch.allclose(out[:, 4:], out[:1, 4:].expand(6, -1, -1, -1))
    assert ops.minibatch_std(torch.randn(3, 4, 2, 2), group_size=4).shape == (3, 5, 2, 2)
    with pytest.raises(AssertionError, match="divisible"):
        ops.minibatch_std(torch.randn(6, 4, 2, 2), group_size=4)


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 1], [1, 4, 6, 4, 1], [1, 5, 10, 10, 5, 1]])
def test_fast_upsample2d_equals_zero_insertion_reference(taps):
    f = ops.setup_filter(taps)
    x = torch.randn(2, 3, 5, 5)
    k = len(taps)
    before, after = (k + 1) // 2, (k - 2) // 2
    reference = ops.fir_filter2d(ops._upsample_zeros(x, 2), f, padding=(before, after) * 2, gain=4)
    fast = ops.upsample2d(x, f)
    assert fast.shape == reference.shape == (2, 3, 10, 10)
    assert torch.allclose(fast, reference, atol=1e-5)


# ------------------------------------------------------------------ fast paths vs reference paths


def _fast_and_reference(fn, *inputs):
    """fn's output and the gradients of a fixed random projection of it, on both paths."""
    results = []
    for reference in (False, True):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        if reference:
            with ops.reference_paths():
                out = fn(*leaves)
        else:
            out = fn(*leaves)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((out * probe).sum(), [t for t in leaves if t.requires_grad])
        results.append((out, grads))
    return results


def test_reference_paths_switch_restores_the_fast_paths():
    assert ops.fast_paths()
    with ops.reference_paths():
        assert not ops.fast_paths()
    assert ops.fast_paths()


@pytest.mark.parametrize("act,gain,clamp,bias", [("lrelu", None, None, True),
                                                  ("lrelu", 0.5, 0.3, True),
                                                  ("lrelu", math.sqrt(0.5), None, False),
                                                  ("linear", 2.0, 1.0, True)])
def test_fast_bias_act_equals_reference(act, gain, clamp, bias):
    inputs = [torch.randn(3, 5, 4, 4)] + ([torch.randn(5)] if bias else [])

    def fn(x, b=None):
        return ops.bias_act(x, b, act=act, gain=gain, clamp=clamp)

    (fast, fast_grads), (ref, ref_grads) = _fast_and_reference(fn, *inputs)
    assert torch.allclose(fast, ref, atol=1e-6)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        assert torch.allclose(g_fast, g_ref, atol=1e-5)


@pytest.mark.parametrize("op", ["fir", "up", "down", "conv_up", "conv_down", "conv_up_1x1"])
def test_fast_resampling_equals_reference_and_keeps_values(op):
    """The channels-last depthwise path gives the reference's numbers (and gradients)."""
    x, w1, w3 = torch.randn(2, 6, 8, 8), torch.randn(5, 6, 1, 1), torch.randn(5, 6, 3, 3)
    fns = {
        "fir": lambda x: ops.fir_filter2d(x, F4, padding=(1, 2, 2, 1), gain=2.0),
        "up": lambda x: ops.upsample2d(x, F4),
        "down": lambda x: ops.downsample2d(x, F4),
        "conv_up": lambda x: ops.conv2d_resample(x, w3, F4, up=2, padding=1),
        "conv_down": lambda x: ops.conv2d_resample(x, w3, F4, down=2, padding=1),
        "conv_up_1x1": lambda x: ops.conv2d_resample(x, w1, F4, up=2),
    }
    (fast, (g_fast,)), (ref, (g_ref,)) = _fast_and_reference(fns[op], x)
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(g_fast, g_ref, atol=1e-5)
    assert ref.is_contiguous()  # the reference path keeps the plain layout


@pytest.mark.parametrize("up,k,demodulate,gain,fused", [(1, 3, True, 1.0, False),
                                                        (2, 3, True, 1.0, False),
                                                        (1, 3, True, 0.7, False),
                                                        (2, 3, True, 1.3, True),
                                                        (1, 1, False, 1.0, False),
                                                        (1, 1, True, 0.5, True)])
def test_fast_modulated_conv_with_noise_equals_reference(up, k, demodulate, gain, fused):
    """Noise in the demodulation pass, the gain folded in, and 1x1 as a batched matmul."""
    x, weight, styles = torch.randn(3, 4, 6, 6), torch.randn(5, 4, k, k), torch.randn(3, 4)
    noise = torch.randn(3, 1, 6 * up, 6 * up)

    def fn(x, weight, styles, noise):
        return ops.modulated_conv2d(x, weight, styles, noise=noise, up=up, padding=k // 2,
                                    resample_filter=F4, demodulate=demodulate, fused=fused,
                                    gain=gain)

    (fast, fast_grads), (ref, ref_grads) = _fast_and_reference(fn, x, weight, styles, noise)
    plain = ops.modulated_conv2d(x, weight, styles, up=up, padding=k // 2, resample_filter=F4,
                                 demodulate=demodulate, fused=False)
    with ops.reference_paths():
        assert torch.allclose(ref, (plain + noise) * gain, atol=1e-5)  # `gain` scales it all
    assert torch.allclose(fast, ref, atol=1e-5)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        assert torch.allclose(g_fast, g_ref, atol=1e-4)


@pytest.mark.parametrize("up,down,k", [(1, 1, 3), (2, 1, 3), (2, 1, 1), (1, 2, 3), (1, 2, 1)])
def test_conv2d_resample_bias_equals_a_bias_added_afterwards(up, down, k):
    """The bias joins the convolution where it is the last step, and is added after the FIR
    otherwise: the same numbers and gradients as adding it to the output, on both paths."""
    x, w, b = torch.randn(2, 6, 8, 8), torch.randn(5, 6, k, k), torch.randn(5)

    def with_bias(x, w, b):
        return ops.conv2d_resample(x, w, F4, up=up, down=down, padding=k // 2, bias=b)

    def added(x, w, b):
        return ops.conv2d_resample(x, w, F4, up=up, down=down, padding=k // 2) \
            + b[None, :, None, None]

    for reference in (False, True):
        outs = []
        for fn in (with_bias, added):
            leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
            with ops.reference_paths() if reference else contextlib.nullcontext():
                out = fn(*leaves)
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
            outs.append((out, torch.autograd.grad((out * probe).sum(), leaves)))
        (out1, g1), (out2, g2) = outs
        assert out1.shape == (2, 5, 8 * up // down, 8 * up // down)
        assert torch.allclose(out1, out2, atol=1e-5)
        assert all(torch.allclose(a, c, atol=1e-4) for a, c in zip(g1, g2))


@pytest.mark.parametrize("up,k,demodulate,noise,fused", [(1, 3, True, "image", False),
                                                         (2, 3, True, "const", False),
                                                         (1, 3, True, None, False),
                                                         (2, 3, True, "image", True),
                                                         (1, 1, False, "image", False),
                                                         (1, 3, False, None, False)])
def test_modulated_conv_bias_is_added_after_the_gain(up, k, demodulate, noise, fused):
    """modulated_conv2d(..., bias=b) == modulated_conv2d(...) + b on the fast and reference
    paths, whatever the noise's shape and the memory layout of x (channels-last included)."""
    x, weight, styles = torch.randn(3, 4, 6, 6), torch.randn(5, 4, k, k), torch.randn(3, 4)
    b = torch.randn(5)
    noises = {"image": torch.randn(3, 1, 6 * up, 6 * up), "const": torch.randn(6 * up, 6 * up),
              None: None}
    kwargs = dict(noise=noises[noise], up=up, padding=k // 2, resample_filter=F4,
                  demodulate=demodulate, fused=fused, gain=1.4)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        for reference in (False, True):
            with ops.reference_paths() if reference else contextlib.nullcontext():
                got = ops.modulated_conv2d(xl, weight, styles, bias=b, **kwargs)
                want = ops.modulated_conv2d(xl, weight, styles, **kwargs) + b[None, :, None, None]
            assert torch.allclose(got, want, atol=1e-5), (layout, reference)
