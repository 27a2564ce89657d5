"""GAN losses and regularizers of StyleGAN2 as pure functions of tensors.

Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2):
- non-saturating logistic loss (Goodfellow et al. 2014): G minimizes softplus(-D(G(z))),
  D minimizes softplus(D(G(z))) + softplus(-D(x));
- R1 regularization (Mescheder et al. 2018, eq. 4): gamma/2 * ||grad_x D(x)||^2 on reals;
- path-length regularization (StyleGAN2 eq. 4): (||J_w^T y||_2 - a)^2 with y ~ N(0, I) / sqrt(H W)
  and a the running mean of the lengths;
- lazy regularization (StyleGAN2 appendix B): Adam's lr and betas rescaled by k / (k + 1) when the
  regularizer runs only every k minibatches;
- style mixing (StyleGAN, Karras et al. 2019, section 3.1) and the generator EMA used for sampling.

Each function matches the NVlabs StyleGAN2Loss / training loop in value; the training loop owns
the weights (gamma, pl_weight), the batch shrink and when each term runs.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors, D w_dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss -log(sigmoid(D(G(z)))) averaged over the batch (a scalar)."""
    return F.softplus(-fake_logits).mean()


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss -log(1 - sigmoid(D(G(z)))) - log(sigmoid(D(x))), each term averaged."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Squared norm of d(real_logits.sum()) / d(real_images) per sample -> [N].

    `real_images` must have requires_grad=True and `real_logits` must have been computed from them
    (through the augmentation, as the official code does). The graph is kept (create_graph=True)
    so the penalty can be back-propagated into D. The caller multiplies by gamma / 2.
    """
    assert real_images.requires_grad, "r1_penalty needs real_images.requires_grad_(True)"
    assert real_logits.shape[0] == real_images.shape[0]
    (grads,) = torch.autograd.grad(
        outputs=[real_logits.sum()], inputs=[real_images], create_graph=True
    )  # [N, C, H, W]
    return grads.square().flatten(1).sum(dim=1)  # [N]


def path_length_penalty(
    images: torch.Tensor,
    ws: torch.Tensor,
    pl_mean: torch.Tensor | float,
    *,
    decay: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Path-length penalty per sample and the updated running mean of the path lengths.

    images [N, C, H, W] = synthesis(ws), ws [N, K, D]. The length of one sample is
    sqrt(mean_K sum_D g^2) with g = d(sum(images * y)) / d(ws), y ~ N(0, 1) / sqrt(H W).
    Returns (penalty [N], new_pl_mean [] detached); the caller multiplies the penalty by pl_weight
    and stores new_pl_mean for the next call. As in the official code the penalty is taken against
    the freshly updated mean, which keeps its (small, decay-scaled) gradient through mean(lengths).
    """
    assert images.ndim == 4 and ws.ndim == 3, "expected images [N, C, H, W] and ws [N, K, D]"
    assert images.shape[0] == ws.shape[0]
    height, width = images.shape[2], images.shape[3]
    noise = torch.randn_like(images) / math.sqrt(height * width)  # [N, C, H, W]
    (grads,) = torch.autograd.grad(
        outputs=[(images * noise).sum()], inputs=[ws], create_graph=True
    )  # [N, K, D]
    lengths = grads.square().sum(dim=2).mean(dim=1).sqrt()  # [N]
    pl_mean = torch.as_tensor(pl_mean, dtype=lengths.dtype, device=lengths.device)
    new_mean = pl_mean + decay * (lengths.mean() - pl_mean)  # []
    penalty = (lengths - new_mean).square()  # [N]
    return penalty, new_mean.detach()


def lazy_regularization_adjust(
    lr: float, betas: tuple[float, float], interval: int
) -> tuple[float, tuple[float, float]]:
    """Adam lr and betas for a network whose regularizer runs every `interval` minibatches.

    With mb_ratio = interval / (interval + 1): lr * mb_ratio and each beta ** mb_ratio, so the
    optimizer's time constants stay those of an unregularized run (StyleGAN2 appendix B).
    """
    if interval < 1:
        raise ValueError(f"regularization interval must be >= 1, got {interval}")
    mb_ratio = interval / (interval + 1)
    beta1, beta2 = betas
    return lr * mb_ratio, (beta1**mb_ratio, beta2**mb_ratio)


def style_mixing_ws(
    mapping_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    ws: torch.Tensor,
    z: torch.Tensor,
    c: torch.Tensor | None,
    prob: float,
) -> torch.Tensor:
    """Mix the styles of `ws` with those of fresh latents, for the whole batch at once.

    One cutoff is drawn per call, uniformly in [1, K - 1], and kept with probability `prob`:
    ws[:, cutoff:] is then replaced by mapping_fn(randn_like(z), c)[:, cutoff:]. Otherwise `ws`
    is returned as it is (and `mapping_fn` is not called). The draws use torch's default CPU
    generator, so the call never waits on an accelerator. `ws` itself is not modified.
    """
    assert ws.ndim == 3 and z.ndim == 2 and ws.shape[0] == z.shape[0], "ws [N, K, D], z [N, Z]"
    num_ws = ws.shape[1]
    if prob <= 0 or num_ws < 2:
        return ws
    cutoff = int(torch.randint(1, num_ws, ()))
    if float(torch.rand(())) >= prob:
        return ws
    mixed = mapping_fn(torch.randn_like(z), c)  # [N, K, D]
    assert mixed.shape == ws.shape, f"mapping gave {tuple(mixed.shape)}, ws is {tuple(ws.shape)}"
    return torch.cat([ws[:, :cutoff], mixed[:, cutoff:]], dim=1)  # [N, K, D]


def ema_beta(
    batch_size: int, ema_kimg: float, cur_nimg: int, rampup: float | None
) -> float:
    """Decay of the generator EMA for one step of `batch_size` images.

    The EMA half-life is ema_kimg thousand images; with `rampup` it is at most cur_nimg * rampup
    images, so the average forgets the random initialization quickly early in training.
    """
    ema_nimg = ema_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema_module: nn.Module, module: nn.Module, beta: float) -> None:
    """Move every parameter of `ema_module` toward `module`: ema = p + beta * (ema - p).

    Buffers (e.g. the tracked average W) are copied. Both modules must have the same names.
    """
    params = dict(module.named_parameters())
    ema_params = dict(ema_module.named_parameters())
    assert params.keys() == ema_params.keys(), "EMA and source modules differ in parameters"
    for name, p_ema in ema_params.items():
        p_ema.copy_(params[name].detach().lerp(p_ema, beta))
    buffers = dict(module.named_buffers())
    ema_buffers = dict(ema_module.named_buffers())
    assert buffers.keys() == ema_buffers.keys(), "EMA and source modules differ in buffers"
    for name, b_ema in ema_buffers.items():
        b_ema.copy_(buffers[name])
