"""StyleGAN2 generator and discriminator (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"; ADA variant: Karras et al. 2020, "Training Generative Adversarial Networks
with Limited Data").

Pure PyTorch. Parameter and buffer names equal those of the official NVlabs networks, so that a
state dict read from an official snapshot loads with `load_state_dict(strict=True)`.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors (num_ws), D w_dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stylegan import ops
from stylegan.errors import UserError


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that shapes a Generator. Saved as JSON beside every checkpoint."""

    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_resolution: int = 256
    img_channels: int = 3
    mapping_layers: int = 8  # number of FC layers in the mapping network (--map-depth)
    mapping_lr_multiplier: float = 0.01
    mapping_layer_features: int | None = None  # hidden width of the mapping network; None: w_dim
    embed_features: int | None = None  # width of the class embedding; None: w_dim
    w_avg_beta: float = 0.998  # decay of the tracked average W
    channel_base: int = 32768  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 512
    num_fp16_res: int = 0  # highest resolutions computed in float16 (CUDA only)
    conv_clamp: float | None = None  # clamp activations to +-conv_clamp (256 in official configs)
    architecture: str = "skip"  # 'orig' | 'skip' | 'resnet'
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    use_noise: bool = True


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Everything that shapes a Discriminator. Saved as JSON beside every checkpoint."""

    c_dim: int = 0
    img_resolution: int = 256
    img_channels: int = 3
    architecture: str = "resnet"  # 'orig' | 'skip' | 'resnet'
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    cmap_dim: int | None = None  # width of the conditioning projection; None: channels at 4x4
    mapping_layers: int = 8  # layers of the conditioning mapping network (used when c_dim > 0)
    mbstd_group_size: int | None = 4  # minibatch-stddev group size; None: whole batch
    mbstd_num_channels: int = 1
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)


ARCHITECTURES = ("orig", "skip", "resnet")
NOISE_MODES = ("const", "random", "none")


def z_from_seed(seed: int, z_dim: int) -> torch.Tensor:
    """The latent official tools use for `seed`: RandomState(seed).randn(1, z_dim) as float32."""
    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim).astype(np.float32))


def channels_at(res: int, *, channel_base: int, channel_max: int) -> int:
    """Feature maps at resolution `res`: min(channel_base // res, channel_max)."""
    return min(channel_base // res, channel_max)


_fp16_on_any_device = False


@contextmanager
def float16_on_any_device() -> Iterator[None]:
    """Within this block the float16 blocks compute float16 on every device, not only on CUDA:
    for checking the float16 path (weight normalisation, activation clamping) on a CPU."""
    global _fp16_on_any_device
    before, _fp16_on_any_device = _fp16_on_any_device, True
    try:
        yield
    finally:
        _fp16_on_any_device = before


def _compute_dtype(use_fp16: bool, force_fp32: bool, device: torch.device) -> torch.dtype:
    # float16 only pays off (and is only tested by NVlabs) on CUDA; CPU computes float32 unless
    # a check asks for float16 with `float16_on_any_device`.
    if use_fp16 and not force_fp32 and (device.type == "cuda" or _fp16_on_any_device):
        return torch.float16
    return torch.float32


def _check_common(name: str, *, img_resolution: int, min_resolution: int, architecture: str,
                  channel_base: int, channel_max: int) -> None:
    res = img_resolution
    if res < min_resolution or res & (res - 1):
        raise UserError(f"{name}: img_resolution {res} must be a power of two >= {min_resolution}; "
                        "resize the dataset or fix the resolution flag.")
    if architecture not in ARCHITECTURES:
        raise UserError(f"{name}: architecture {architecture!r} is unknown; use one of "
                        f"{', '.join(ARCHITECTURES)}.")
    if channels_at(res, channel_base=channel_base, channel_max=channel_max) < 1:
        raise UserError(f"{name}: channel_base {channel_base} gives no channels at {res} px; "
                        "raise --cbase.")


def _check_labels(c: torch.Tensor | None, *, n: int, c_dim: int) -> torch.Tensor | None:
    """Validate the conditioning labels; None when the network is unconditional."""
    if c_dim == 0:
        assert c is None or tuple(c.shape) == (n, 0), f"c must be None or [{n}, 0], got {c.shape}"
        return None
    assert c is not None and tuple(c.shape) == (n, c_dim), \
        f"c must be [{n}, {c_dim}], got {None if c is None else tuple(c.shape)}"
    return c


# ---------------------------------------------------------------------------------------------
# Layers with equalized learning rate (Karras et al. 2018, Sec. 4.1)


class FullyConnectedLayer(nn.Module):
    """y = act(x @ (W * lr_mul / sqrt(in)).T + b * lr_mul); W stored as randn / lr_mul."""

    def __init__(self, in_features: int, out_features: int, *, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias: bool = True, bias_init: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and x.shape[1] == self.in_features, (x.shape, self.in_features)
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        return ops.bias_act(x @ w.t(), b, act=self.activation)  # [N, out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.activation}"


class Conv2dLayer(nn.Module):
    """Convolution with equalized learning rate, optional FIR up/down-sampling, bias_act, clamp."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 activation: str = "linear", bias: bool = True, up: int = 1, down: int = 1,
                 resample_filter: tuple[int, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation, self.up, self.down = activation, up, down
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = nn.Parameter(torch.randn(shape))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, *, gain: float = 1.0) -> torch.Tensor:
        act_gain = ops.activation_gain(self.activation) * gain
        weight_gain, bias = self.weight_gain, self.bias
        if ops.fast_paths() and act_gain > 0:
            # Both activations are positively homogeneous, so the output gain folds into the
            # (small) weight and bias instead of taking a pass over the activations.
            weight_gain = weight_gain * act_gain
            bias = None if bias is None else bias * act_gain
            act_gain = 1.0
        w = self.weight * weight_gain
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        if act_gain == 1 and ops.fast_paths():
            # The bias is added inside the convolution, and lrelu overwrites the convolution's
            # own fresh output (its backward needs only that output): one pass over x, not two.
            x = ops.conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down,
                                    padding=self.padding, bias=bias)
            return ops.activate_(x, self.activation, clamp)
        x = ops.conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down,
                                padding=self.padding)  # [N, O, H * up / down, W * up / down]
        return ops.bias_act(x, bias, act=self.activation, gain=act_gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, act={self.activation}, "
                f"up={self.up}, down={self.down}")


# ---------------------------------------------------------------------------------------------
# Mapping network (StyleGAN, Karras et al. 2019, Sec. 2): z (+ embedded c) -> w


class MappingNetwork(nn.Module):
    """z, c -> w with num_layers lrelu FC layers; tracks the average w for truncation."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, *, num_ws: int | None,
                 num_layers: int = 8, layer_features: int | None = None,
                 embed_features: int | None = None, lr_multiplier: float = 0.01,
                 w_avg_beta: float | None = 0.998) -> None:
        super().__init__()
        assert z_dim + c_dim > 0 and num_layers >= 1, (z_dim, c_dim, num_layers)
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed_features = (w_dim if embed_features is None else embed_features) if c_dim else 0
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu",
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def _embed_inputs(self, z: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(ops.normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            parts.append(ops.normalize_2nd_moment(self.embed(c.to(torch.float32))))
        return torch.cat(parts, dim=1)  # [N, z_dim + embed_features]

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None = None, *,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_emas: bool = False) -> torch.Tensor:
        """[N, z_dim], [N, c_dim] -> [N, num_ws, w_dim] (or [N, w_dim] when num_ws is None)."""
        if self.z_dim > 0:
            assert z is not None and z.ndim == 2 and z.shape[1] == self.z_dim, \
                f"z must be [N, {self.z_dim}], got {None if z is None else tuple(z.shape)}"
        n = z.shape[0] if self.z_dim > 0 else c.shape[0]
        c = _check_labels(c, n=n, c_dim=self.c_dim)
        x = self._embed_inputs(z, c)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)  # [N, w_dim] after the last layer
        if update_emas and hasattr(self, "w_avg"):
            # w_avg <- beta * w_avg + (1 - beta) * batch mean
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)  # [N, num_ws, w_dim]
        if truncation_psi != 1:
            x = self._truncate(x, truncation_psi, truncation_cutoff)
        return x

    def _truncate(self, ws: torch.Tensor, psi: float, cutoff: int | None) -> torch.Tensor:
        """w = w_avg + psi * (w - w_avg), on ws[:, :cutoff] only when a cutoff is given."""
        assert hasattr(self, "w_avg"), "truncation needs the tracked w_avg"
        truncated = self.w_avg.lerp(ws, psi)
        if cutoff is None:
            return truncated
        keep = torch.arange(ws.shape[1], device=ws.device) < cutoff  # [num_ws]
        return torch.where(keep[None, :, None], truncated, ws)


# ---------------------------------------------------------------------------------------------
# Synthesis network (StyleGAN2, Fig. 2d and Fig. 7 'skip' generator)


class SynthesisLayer(nn.Module):
    """Modulated, demodulated 3x3 conv (+ up=2), per-pixel noise, bias, lrelu, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True,
                 activation: str = "lrelu", resample_filter: tuple[int, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = nn.Parameter(torch.randn(shape))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))

    def _noise(self, x: torch.Tensor, noise_mode: str) -> torch.Tensor | None:
        assert noise_mode in NOISE_MODES, f"noise_mode must be one of {NOISE_MODES}"
        if not self.use_noise or noise_mode == "none":
            return None
        if noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            return torch.randn(shape, device=x.device) * self.noise_strength  # [N, 1, H, W]
        return self.noise_const * self.noise_strength  # [H, W]

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str = "const",
                fused_modconv: bool = True, gain: float = 1.0) -> torch.Tensor:
        """[N, I, H, W], [N, w_dim] -> [N, O, H * up, W * up]"""
        expected = self.resolution // self.up
        assert x.shape[1:] == (self.in_channels, expected, expected), (x.shape, expected)
        styles = self.affine(w)  # [N, I]
        act_gain, bias, conv_gain = ops.activation_gain(self.activation) * gain, self.bias, 1.0
        if ops.fast_paths() and act_gain > 0:
            # As in Conv2dLayer: the gain folds into the demodulation coefficients and the bias.
            conv_gain, bias, act_gain = act_gain, bias * act_gain, 1.0
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        # Demodulation normalises the weight, so it gets no 1/sqrt(fan_in) gain.
        kwargs = dict(noise=self._noise(x, noise_mode), up=self.up, padding=self.padding,
                      resample_filter=self.resample_filter, fused=fused_modconv, gain=conv_gain)
        if act_gain == 1 and ops.fast_paths():
            # The bias joins the noise in the demodulation pass; lrelu overwrites that pass's
            # fresh output (its backward needs only the output).
            x = ops.modulated_conv2d(x, self.weight, styles, bias=bias, **kwargs)
            return ops.activate_(x, self.activation, clamp)
        x = ops.modulated_conv2d(x, self.weight, styles, **kwargs)
        return ops.bias_act(x, bias, act=self.activation, gain=act_gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation: features -> image channels."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, kernel_size: int = 1,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = nn.Parameter(torch.randn(shape))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor, *,
                fused_modconv: bool = True) -> torch.Tensor:
        """[N, I, H, W], [N, w_dim] -> [N, img_channels, H, W]"""
        styles = self.affine(w) * self.weight_gain  # [N, I]
        x = ops.modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused_modconv)
        return ops.bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (const | upsampling conv0) -> conv1 -> toRGB."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, is_last: bool, *, architecture: str = "skip",
                 resample_filter: tuple[int, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, use_fp16: bool = False,
                 use_noise: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.img_channels = resolution, img_channels
        self.is_last, self.architecture, self.use_fp16 = is_last, architecture, use_fp16
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        layer_kwargs = dict(resample_filter=resample_filter, conv_clamp=conv_clamp,
                            use_noise=use_noise)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        **layer_kwargs)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, **layer_kwargs)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1 if (is_last or architecture == "skip") else 0
        if self.num_torgb:
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, up=2,
                                    resample_filter=resample_filter)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, *,
                noise_mode: str = "const", force_fp32: bool = False,
                fused_modconv: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One resolution step: x [N, I, H/2, W/2] -> x [N, O, H, W], img [N, C, H, W].

        ws [N, num_conv + num_torgb, w_dim]; x is None in the 4x4 block, img is None until the
        first toRGB.
        """
        n = ws.shape[0]
        assert ws.shape[1] == self.num_conv + self.num_torgb, (ws.shape, self.num_conv)
        dtype = _compute_dtype(self.use_fp16, force_fp32, ws.device)
        if fused_modconv is None:
            # The official rule (fused when not training and float32) on CUDA; on the CPU one
            # grouped convolution per batch is slower than the plain path (bench/generate.py:
            # 66 vs 111 img/s at batch 64, 64 px), so it is used there for single images only.
            on_cuda = ws.device.type == "cuda"
            fused_modconv = (not self.training) and ((on_cuda and dtype == torch.float32) or n == 1)
        layer_kwargs = dict(noise_mode=noise_mode, fused_modconv=fused_modconv)
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat(n, 1, 1, 1)  # [N, O, 4, 4]
            x = self.conv1(x, next(w_iter), **layer_kwargs)
        elif self.architecture == "resnet":
            x = x.to(dtype)
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), **layer_kwargs)
            x = y + self.conv1(x, next(w_iter), gain=math.sqrt(0.5), **layer_kwargs)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), **layer_kwargs)
            x = self.conv1(x, next(w_iter), **layer_kwargs)
        if img is not None:
            img = ops.upsample2d(img, self.resample_filter)  # [N, C, H, W]
        if self.num_torgb:
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, C, H, W]: SynthesisBlocks at 4, 8, ..., img_resolution."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, *,
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 architecture: str = "skip", resample_filter: tuple[int, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, use_noise: bool = True) -> None:
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            ch = channels_at(res, channel_base=channel_base, channel_max=channel_max)
            in_ch = 0 if res == 4 else channels_at(res // 2, channel_base=channel_base,
                                                   channel_max=channel_max)
            block = SynthesisBlock(in_ch, ch, w_dim, res, img_channels,
                                   is_last=(res == img_resolution), architecture=architecture,
                                   resample_filter=resample_filter, conv_clamp=conv_clamp,
                                   use_fp16=(res >= fp16_resolution), use_noise=use_noise)
            self.num_ws += block.num_conv
            if res == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, *, noise_mode: str = "const", force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), \
            f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}"
        assert noise_mode in NOISE_MODES, f"noise_mode must be one of {NOISE_MODES}"
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            # A block's toRGB shares its style vector with the next block's conv0.
            block_ws = ws[:, w_idx: w_idx + block.num_conv + block.num_torgb]
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode, force_fp32=force_fp32,
                           fused_modconv=fused_modconv)
        # The fast ops compute in channels-last memory; callers get the plain layout (randn_like
        # of the image, as in the path-length penalty, then draws the same numbers).
        return img.contiguous()  # [N, C, H, W]


class Generator(nn.Module):
    """StyleGAN2 generator: `mapping` (z, c -> ws) followed by `synthesis` (ws -> image)."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        _check_common("GeneratorConfig", img_resolution=cfg.img_resolution, min_resolution=4,
                      architecture=cfg.architecture, channel_base=cfg.channel_base,
                      channel_max=cfg.channel_max)
        if cfg.mapping_layers < 1 or cfg.z_dim + cfg.c_dim < 1 or cfg.w_dim < 1:
            raise UserError(f"GeneratorConfig: mapping_layers ({cfg.mapping_layers}), "
                            "z_dim + c_dim and w_dim must be at least 1; fix --map-depth or the "
                            "latent sizes.")
        self.cfg = cfg
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        self.synthesis = SynthesisNetwork(
            cfg.w_dim, cfg.img_resolution, cfg.img_channels, channel_base=cfg.channel_base,
            channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res,
            architecture=cfg.architecture, resample_filter=tuple(cfg.resample_filter),
            conv_clamp=cfg.conv_clamp, use_noise=cfg.use_noise)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            cfg.z_dim, cfg.c_dim, cfg.w_dim, num_ws=self.num_ws, num_layers=cfg.mapping_layers,
            layer_features=cfg.mapping_layer_features, embed_features=cfg.embed_features,
            lr_multiplier=cfg.mapping_lr_multiplier, w_avg_beta=cfg.w_avg_beta)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, *,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                noise_mode: str = "const", update_emas: bool = False, force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        """[N, z_dim], [N, c_dim] -> image [N, img_channels, H, W], roughly in [-1, 1]."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi,
                          truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32,
                              fused_modconv=fused_modconv)


# ---------------------------------------------------------------------------------------------
# Discriminator (StyleGAN2, Fig. 7 'resnet' discriminator)


class DiscriminatorBlock(nn.Module):
    """One resolution of the discriminator: (fromRGB) -> conv0 -> conv1 (down=2), + resnet skip."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, *, architecture: str = "resnet",
                 resample_filter: tuple[int, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, use_fp16: bool = False) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.architecture, self.use_fp16 = architecture, use_fp16
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        conv_kwargs = dict(resample_filter=resample_filter, conv_clamp=conv_clamp)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu",
                                       **conv_kwargs)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", **conv_kwargs)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2,
                                 **conv_kwargs)
        if architecture == "resnet":
            # The official skip layer has no activation clamp (conv_clamp stays None).
            self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2,
                                    resample_filter=resample_filter)

    def layers(self) -> list[nn.Module]:
        """This block's layers in the official freeze-counting order."""
        names = ("fromrgb", "conv0", "conv1", "skip")
        return [getattr(self, name) for name in names if hasattr(self, name)]

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, *,
                force_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, tmp, H, W] (None in the first block), img [N, C, H, W] -> x [N, out, H/2, W/2]."""
        dtype = _compute_dtype(self.use_fp16, force_fp32, (img if x is None else x).device)
        if x is not None:
            x = x.to(dtype)
        if hasattr(self, "fromrgb"):
            y = self.fromrgb(img.to(dtype))  # [N, tmp, H, W]
            x = y if x is None else x + y
            skip = self.architecture == "skip"
            img = ops.downsample2d(img, self.resample_filter) if skip else None
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = y + self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        else:
            x = self.conv1(self.conv0(x))
        return x, img


class MinibatchStdLayer(nn.Module):
    """Appends the minibatch standard deviation as `num_channels` feature maps (no parameters)."""

    def __init__(self, group_size: int | None, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.minibatch_std(x, group_size=self.group_size, num_channels=self.num_channels)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: (fromRGB) -> minibatch stddev -> conv -> fc -> out (1 logit or cmap_dim values)."""

    def __init__(self, in_channels: int, cmap_dim: int, img_channels: int, *,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4,
                 mbstd_num_channels: int = 1, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.cmap_dim, self.architecture = in_channels, cmap_dim, architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, 1, activation="lrelu")
        if mbstd_num_channels > 0:
            self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels)
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3,
                                activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * 16, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def layers(self) -> list[nn.Module]:
        """The epilogue's layers with parameters, in order."""
        names = ("fromrgb", "conv", "fc", "out")
        return [getattr(self, name) for name in names if hasattr(self, name)]

    def features(self, x: torch.Tensor, img: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """x [N, C4, 4, 4] -> {'conv': [N, C4, 4, 4], 'fc': [N, C4], 'out': [N, 1 or cmap_dim]}."""
        assert x.shape[1:] == (self.in_channels, 4, 4), x.shape
        x = x.to(torch.float32)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if hasattr(self, "mbstd"):
            x = self.mbstd(x)  # [N, C4 + F, 4, 4]
        conv = self.conv(x)
        fc = self.fc(conv.flatten(1))
        return {"conv": conv, "fc": fc, "out": self.out(fc)}

    def project(self, out: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        """Logits [N, 1]: `out` itself, or its projection on the conditioning cmap."""
        if self.cmap_dim == 0:
            return out
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


class Discriminator(nn.Module):
    """StyleGAN2 discriminator: blocks from img_resolution down to 8, then the 4x4 epilogue."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        _check_common("DiscriminatorConfig", img_resolution=cfg.img_resolution, min_resolution=8,
                      architecture=cfg.architecture, channel_base=cfg.channel_base,
                      channel_max=cfg.channel_max)
        self.cfg = cfg
        self.c_dim, self.img_resolution, self.img_channels = (cfg.c_dim, cfg.img_resolution,
                                                              cfg.img_channels)
        log2 = int(math.log2(cfg.img_resolution))
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        fp16_resolution = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8)
        ch = {res: channels_at(res, channel_base=cfg.channel_base, channel_max=cfg.channel_max)
              for res in self.block_resolutions + [4]}
        cmap_dim = 0 if cfg.c_dim == 0 else (ch[4] if cfg.cmap_dim is None else cfg.cmap_dim)
        self.cmap_dim = cmap_dim
        for res in self.block_resolutions:
            in_ch = ch[res] if res < cfg.img_resolution else 0
            block = DiscriminatorBlock(in_ch, ch[res], ch[res // 2], res, cfg.img_channels,
                                       architecture=cfg.architecture,
                                       resample_filter=tuple(cfg.resample_filter),
                                       conv_clamp=cfg.conv_clamp,
                                       use_fp16=(res >= fp16_resolution))
            setattr(self, f"b{res}", block)
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(0, cfg.c_dim, cmap_dim, num_ws=None,
                                          num_layers=cfg.mapping_layers, w_avg_beta=None)
        self.b4 = DiscriminatorEpilogue(ch[4], cmap_dim, cfg.img_channels,
                                        architecture=cfg.architecture,
                                        mbstd_group_size=cfg.mbstd_group_size,
                                        mbstd_num_channels=cfg.mbstd_num_channels,
                                        conv_clamp=cfg.conv_clamp)

    def freezable_layers(self) -> list[nn.Module]:
        """Layers in the official counting order of `--freezed N` (highest resolution first)."""
        layers = []
        for res in self.block_resolutions:
            layers += getattr(self, f"b{res}").layers()
        return layers + self.b4.layers()

    def _trunk(self, img: torch.Tensor, *, force_fp32: bool) -> dict[str, torch.Tensor]:
        res = self.img_resolution
        assert img.ndim == 4 and img.shape[1:] == (self.img_channels, res, res), \
            f"img must be [N, {self.img_channels}, {res}, {res}], got {tuple(img.shape)}"
        feats = {}
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, force_fp32=force_fp32)
            feats[f"b{res}"] = x.to(torch.float32)  # [N, ch(res/2), res/2, res/2]
        head = self.b4.features(x, img)
        feats.update({f"b4.{name}": value for name, value in head.items()})
        return feats

    def block_features(self, img: torch.Tensor, c: torch.Tensor | None = None, *,
                       force_fp32: bool = False) -> dict[str, torch.Tensor]:
        """Intermediate activations: 'b{res}' (tensor leaving each block), 'b4.conv', 'b4.fc'.

        The features do not depend on c (labels only enter the final projection); c is checked
        when given.
        """
        if c is not None:
            _check_labels(c, n=img.shape[0], c_dim=self.c_dim)
        feats = self._trunk(img, force_fp32=force_fp32)
        del feats["b4.out"]
        return {name: value.contiguous() for name, value in feats.items()}  # plain layout

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, *,
                force_fp32: bool = False) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1], labels [N, c_dim] -> logits [N, 1]."""
        c = _check_labels(c, n=img.shape[0], c_dim=self.c_dim)
        out = self._trunk(img, force_fp32=force_fp32)["b4.out"]
        cmap = None if c is None else self.mapping(None, c)  # [N, cmap_dim]
        return self.b4.project(out, cmap)
