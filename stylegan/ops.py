"""Low-level tensor operations of StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"): FIR up/down-sampling, convolution with resampling, weight modulation and
demodulation (Sec. 2.2, Eq. 1-3), bias + activation, and minibatch standard deviation (Karras et
al. 2018, "Progressive Growing of GANs", Sec. 3).

Pure PyTorch, float32 or float16, any device. Every function is stateless.

Fast paths (depthwise FIR filters in channels-last memory, fused bias + activation, noise added
in the same pass as demodulation) compute the same maths as the plain reference paths up to float
rounding; `reference_paths()` switches them off, and the tests compare both.

Shape letters: N batch, C channels, H/W height/width, O/I output/input channels, K kernel size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

ACTIVATIONS = ("linear", "lrelu")
LRELU_SLOPE = 0.2
_fast_paths = True


@contextmanager
def reference_paths() -> Iterator[None]:
    """Within this block every op takes its plain reference path (for tests and benchmarks)."""
    global _fast_paths
    before, _fast_paths = _fast_paths, False
    try:
        yield
    finally:
        _fast_paths = before


def fast_paths() -> bool:
    """Whether the ops take their fast paths (True unless inside `reference_paths()`)."""
    return _fast_paths


def activation_gain(act: str) -> float:
    """Gain that keeps the activation's output variance equal to its input's (He et al. 2015)."""
    gains = {"linear": 1.0, "lrelu": math.sqrt(2.0)}
    if act not in gains:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return gains[act]


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """x + b (along dim 1) -> activation -> * gain -> clamp to [-clamp, clamp].

    `gain` defaults to the activation's own gain (sqrt(2) for lrelu, 1 for linear).
    """
    if b is not None:
        assert b.ndim == 1 and b.shape[0] == x.shape[1], (b.shape, x.shape)
    gain = activation_gain(act) if gain is None else gain
    if _fast_paths and act == "lrelu" and gain > 0:
        # lrelu is positively homogeneous: g * lrelu(x + b) = lrelu(g * x + g * b), which takes
        # two passes over x instead of three (one when the caller folded g into x and b).
        if b is not None:
            b = b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
            x = x + b if gain == 1 else torch.add(b * gain, x, alpha=gain)
        elif gain != 1:
            x = x * gain
        x = F.leaky_relu(x, LRELU_SLOPE)
        return x if clamp is None else x.clamp(-clamp, clamp)
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    elif act != "linear":
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def activate_(x: torch.Tensor, act: str, clamp: float | None = None) -> torch.Tensor:
    """Activation `act` (gain 1) in place on a fresh tensor nothing else holds, e.g. a
    convolution's output with its bias already added, then clamp to [-clamp, clamp]. lrelu's
    backward needs only its output, so autograd allows the in-place form."""
    if act == "lrelu":
        x = F.leaky_relu_(x, LRELU_SLOPE)
    elif act != "linear":
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return x if clamp is None else x.clamp(-clamp, clamp)


def normalize_2nd_moment(x: torch.Tensor, *, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale x so that its mean square along `dim` is 1 (pixel norm of the latent)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def setup_filter(taps: Sequence[float]) -> torch.Tensor:
    """2-D separable FIR filter from 1-D taps, normalised to sum 1: [K, K]."""
    f = torch.as_tensor(np.asarray(taps, dtype=np.float32))
    assert f.ndim == 1 and f.numel() > 0, "filter taps must be a non-empty 1-D sequence"
    f2 = torch.outer(f, f)  # [K, K]
    return f2 / f2.sum()


def _depthwise_conv2d(x: torch.Tensor, kernel: torch.Tensor, *, transposed: bool = False,
                      **kwargs) -> torch.Tensor:
    """conv2d / conv_transpose2d with groups = channels; kernel [C, 1, K, K].

    oneDNN's depthwise kernels are several times faster on channels-last tensors than on
    contiguous ones (measured on x86 CPUs: 32 ch at 64 px, 3 to 10x), so the fast path computes
    in channels-last memory; later layers keep that layout (convolution outputs follow their
    input's).
    """
    if _fast_paths and x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    conv = F.conv_transpose2d if transposed else F.conv2d
    return conv(x, kernel, groups=x.shape[1], **kwargs)


def fir_filter2d(
    x: torch.Tensor,
    f: torch.Tensor,
    *,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
    down: int = 1,
) -> torch.Tensor:
    """Pad (left, right, top, bottom), convolve every channel with the 2-D filter f, keep every
    `down`-th sample starting at 0.

    [N, C, H, W] -> [N, C, (H + top + bottom - K) // down + 1, ...]
    """
    assert x.ndim == 4 and f.ndim == 2, (x.shape, f.shape)
    channels = x.shape[1]
    same = padding[0] if len(set(padding)) == 1 else None
    if same is None:
        x = F.pad(x, list(padding))
    # True convolution = cross-correlation with the flipped filter (a no-op for symmetric taps).
    kernel = (f * gain).flip([0, 1]).to(x.dtype)
    kernel = kernel[None, None].expand(channels, 1, -1, -1)  # [C, 1, K, K]
    # A strided convolution keeps every `down`-th sample from 0 without computing the others.
    return _depthwise_conv2d(x, kernel, padding=same or 0, stride=down)


def _upsample_zeros(x: torch.Tensor, up: int) -> torch.Tensor:
    """Insert up-1 zeros after every sample on both spatial axes.

    [N, C, H, W] -> [N, C, up*H, up*W]
    """
    n, c, h, w = x.shape
    out = x.new_zeros([n, c, h, up, w, up])
    out[:, :, :, 0, :, 0] = x
    return out.reshape(n, c, h * up, w * up)


def upsample2d(x: torch.Tensor, f: torch.Tensor, *, up: int = 2) -> torch.Tensor:
    """FIR upsampling by `up`: zero insertion, then the filter with gain up^2.

    [N, C, H, W] -> [N, C, up*H, up*W]. Computed as a depthwise transposed convolution (the
    polyphase form skips the products with the inserted zeros):
    out[q] = sum_j x[j] * f[q + K - 1 - before - up * j].
    """
    k = f.shape[-1]
    before, after = (k + up - 1) // 2, (k - up) // 2  # (2, 1) for 4 taps and up = 2
    c = x.shape[1]
    crop = k - 1 - before
    extra = up - k + 2 * crop  # output_padding that makes the size exactly up * H
    if crop < 0 or not 0 <= extra < up:
        x = _upsample_zeros(x, up)  # reference path for unusual filter lengths
        return fir_filter2d(x, f, padding=(before, after, before, after), gain=up * up)
    kernel = (f * (up * up)).to(x.dtype)[None, None].expand(c, 1, -1, -1)  # [C, 1, K, K]
    return _depthwise_conv2d(x, kernel, transposed=True, stride=up, padding=crop,
                             output_padding=extra)


def downsample2d(x: torch.Tensor, f: torch.Tensor, *, down: int = 2) -> torch.Tensor:
    """FIR downsampling by `down`: filter (gain 1), keep every `down`-th sample.

    [N, C, H, W] -> [N, C, H/down, W/down]
    """
    k = f.shape[-1]
    before, after = (k - down + 1) // 2, (k - down) // 2  # (1, 1) for 4 taps and down = 2
    return fir_filter2d(x, f, padding=(before, after, before, after), down=down)


def _transposed_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv weight [O, I, K, K] (O = groups * O_g) -> [groups * I, O_g, K, K], as
    conv_transpose2d wants it."""
    o, i, kh, kw = w.shape
    w = w.reshape(groups, o // groups, i, kh, kw).transpose(1, 2)
    return w.reshape(groups * i, o // groups, kh, kw)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    *,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolution (cross-correlation with w as stored) combined with FIR up- or downsampling,
    plus `bias` [O] (inside the convolution where it is the last step: no extra pass).

    up=1, down=1: conv2d with `padding`.
    up>1, K>1:    conv_transpose2d (stride up, weight as stored, no flip), then FIR (gain up^2).
    up>1, K=1:    1x1 conv, then upsample2d.
    down>1, K>1:  FIR (gain 1), then conv2d with stride down.
    down>1, K=1:  downsample2d, then 1x1 conv.
    The output size is H * up / down when padding = K // 2.
    """
    assert x.ndim == 4 and w.ndim == 4 and w.shape[1] * groups == x.shape[1], (x.shape, w.shape)
    assert up == 1 or down == 1, "simultaneous up- and downsampling is not supported"
    k = w.shape[-1]
    w = w.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if up == 1 and down == 1:
        return F.conv2d(x, w, b, padding=padding, groups=groups)
    assert f is not None, "resampling needs a FIR filter"
    fk = f.shape[-1]
    if up > 1 and k == 1:
        return _add_bias(upsample2d(F.conv2d(x, w, padding=padding, groups=groups), f, up=up), b)
    if down > 1 and k == 1:
        return F.conv2d(downsample2d(x, f, down=down), w, b, padding=padding, groups=groups)
    if down > 1:
        before = padding + (fk - down + 1) // 2
        after = padding + (fk - down) // 2
        x = fir_filter2d(x, f, padding=(before, after, before, after))  # [N, I, H + 1, W + 1]
        return F.conv2d(x, w, b, stride=down, groups=groups)
    # up > 1, K > 1: the transposed conv grows H to (H - 1) * up + K; the FIR trims it to up * H.
    before = padding + (fk + up - 1) // 2 - (k - 1)
    after = padding + (fk - up) // 2 - (k - up)
    assert before >= 0 and after >= 0, f"padding {padding} too small for up={up}, kernel {k}"
    x = F.conv_transpose2d(x, _transposed_weight(w, groups), stride=up, groups=groups)
    return _add_bias(fir_filter2d(x, f, padding=(before, after, before, after), gain=up * up), b)


def _channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()


def _add_bias(x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x if b is None else x + b.reshape(1, -1, 1, 1)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    fused: bool = True,
    gain: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """StyleGAN2 weight modulation (Eq. 1) and demodulation (Eq. 3), then conv, then + noise,
    all times `gain`, then + `bias` [O] (not scaled by `gain`).

    x [N, I, H, W], weight [O, I, K, K], styles [N, I], noise broadcastable to [N, O, H', W'].
    fused=True: one grouped convolution with per-sample weights; fused=False: x is scaled by the
    styles, convolved with the shared weight, then scaled by the demodulation coefficients.
    The fast path computes a 1x1 convolution (toRGB) as one batched matmul with per-sample
    weights, whatever `fused` says, and folds `gain` into the demodulation coefficients.
    """
    n, i, _, _ = x.shape
    o, wi, kh, kw = weight.shape
    assert wi == i and styles.shape == (n, i), (x.shape, weight.shape, styles.shape)
    if x.dtype == torch.float16 and demodulate:
        # Keep float16 in range; demodulation cancels both scale factors exactly.
        weight = weight / weight.abs().amax(dim=[1, 2, 3], keepdim=True) / math.sqrt(i * kh * kw)
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        # sum over (I, K, K) of (weight * style)^2 = styles^2 @ (sum over K, K of weight^2).T;
        # this avoids building the [N, O, I, K, K] tensor on the plain path.
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # [N, O]
    if _fast_paths and kh == kw == 1 and up == 1:
        x = _modulated_1x1(x, weight, styles, dcoefs, gain)
        x = x if noise is None else x + noise.to(x.dtype) * gain
        return _add_bias(x, bias)
    elif not fused:
        x = x * styles.to(x.dtype)[:, :, None, None]
        x = conv2d_resample(x, weight, resample_filter, up=up, padding=padding)
        if dcoefs is not None:
            dcoefs = dcoefs.to(x.dtype)[:, :, None, None]  # [N, O, 1, 1]
            if _fast_paths:
                # (x * d + noise) * g + b in one pass over x (the addend is small unless the
                # noise is drawn per image)
                addend = None if noise is None else noise.to(x.dtype) * gain
                if bias is not None:
                    b = bias.to(x.dtype).reshape(1, -1, 1, 1)
                    addend = b if addend is None else addend + b
                if addend is None:
                    return x * (dcoefs * gain)
                if addend.ndim == 4 and _channels_last(x):  # mixed layouts are slow to add
                    addend = addend.contiguous(memory_format=torch.channels_last)
                return torch.addcmul(addend, x, dcoefs * gain)
            x = x * dcoefs
    else:
        scale = styles[:, None, :]  # [N, 1, I]
        if dcoefs is not None:
            scale = scale * dcoefs[:, :, None]  # [N, O, I]
        w = weight[None] * scale[:, :, :, None, None]  # [N, O, I, K, K]
        x = x.reshape(1, n * i, *x.shape[2:])  # [1, N*I, H, W]
        w = w.reshape(n * o, i, kh, kw)  # [N*O, I, K, K]
        x = conv2d_resample(x, w, resample_filter, up=up, padding=padding, groups=n)
        x = x.reshape(n, o, *x.shape[2:])  # [N, O, H', W']
    if noise is not None:
        x = x + noise.to(x.dtype)
    return _add_bias(x if gain == 1 else x * gain, bias)


def _modulated_1x1(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                   dcoefs: torch.Tensor | None, gain: float) -> torch.Tensor:
    """1x1 modulated convolution as x @ per-sample weights: no pass scaling x by the styles.

    [N, I, H, W] -> [N, O, H, W]; with channels-last x every reshape here is a view.
    """
    n, i, h, w = x.shape
    wn = weight[None, :, :, 0, 0] * styles[:, None, :]  # [N, O, I]
    if dcoefs is not None:
        wn = wn * dcoefs[:, :, None]
    if gain != 1:
        wn = wn * gain
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, i)  # [N, H*W, I]
    out = torch.bmm(pixels, wn.transpose(1, 2).to(x.dtype))  # [N, H*W, O]
    return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)  # [N, O, H, W], channels-last


def minibatch_std(
    x: torch.Tensor, *, group_size: int | None = 4, num_channels: int = 1
) -> torch.Tensor:
    """Append the minibatch standard deviation as F extra feature maps.

    [N, C, H, W] -> [N, C + F, H, W].

    Groups take every (N/G)-th sample: sample i belongs to group i % (N/G).
    """
    n, c, h, w = x.shape
    g = n if group_size is None else min(group_size, n)
    f = num_channels
    assert n % g == 0, f"minibatch-stddev: batch size {n} must be divisible by the group size {g}"
    assert c % f == 0, f"minibatch-stddev: {c} channels not divisible into {f} groups"
    y = x.reshape(g, -1, f, c // f, h, w)  # [G, N/G, F, C/F, H, W]
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [N/G, F, C/F, H, W]
    y = y.mean(dim=[2, 3, 4])  # [N/G, F]
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)  # [N, F, H, W]
    return torch.cat([x, y], dim=1)
