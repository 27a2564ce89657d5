"""The reference without the ImageNet extra: a small CNN trained from scratch on the labelled
validation images, as supervised dermoscopy classifiers are usually trained (conv / batch norm /
ReLU / max-pool blocks, global average pool, one logit; class-balanced binary cross-entropy,
Adam, random flips and quarter turns, since a lesion has no up or down).

The number of epochs is the one setting chosen, by the pooled out-of-fold AUC of lesion-grouped
cross-validation inside the training rows (anomaly/evaluation/reference/classifier.grouped_folds);
the network is then retrained on all of them for that many epochs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from anomaly.evaluation.metrics import roc_auc
from anomaly.evaluation.reference.classifier import FittedReference, grouped_folds
from stylegan.progress import progress as progress_bar

WIDTH = 16  # channels of the first block; doubled per block
LR, WEIGHT_DECAY, TRAIN_BATCH = 1e-3, 1e-4, 64


class SmallCNN(nn.Module):
    """uint8-derived images [N, C, S, S] in [-1, 1] -> anomaly logit [N]."""

    def __init__(self, channels: int = 3, width: int = WIDTH, blocks: int = 4):
        super().__init__()
        layers, c_in = [], channels
        for i in range(blocks):
            c_out = width * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))  # [N, width * 2^(blocks-1)]
        return self.fc(h).squeeze(1)  # [N]


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [N, C, H, W] in [-1, 1]."""
    return images_u8.float() / 127.5 - 1.0


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right and turned by k quarter turns, both at random."""
    flips = torch.rand(len(x), generator=generator) < 0.5
    turns = torch.randint(0, 4, (len(x),), generator=generator)
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x, turns)])


class CNNScorer:
    """A trained SmallCNN with the classifier interface (`decision_function`)."""

    def __init__(self, net: SmallCNN, batch: int = 256):
        self.net, self.batch = net.eval(), batch

    @torch.inference_mode()
    def decision_function(self, images_u8: torch.Tensor) -> np.ndarray:
        parts = [self.net(to_input(images_u8[i:i + self.batch]))
                 for i in range(0, len(images_u8), self.batch)]
        return torch.cat(parts).numpy().astype(np.float64) if parts else np.zeros(0)


def train_small_cnn(images_u8: torch.Tensor, y: np.ndarray, *, epochs: int, seed: int = 0,
                    checkpoints: tuple[int, ...] = (), on_checkpoint=None,
                    progress: tqdm | None = None) -> SmallCNN:
    """Train a SmallCNN for `epochs` epochs; after each epoch in `checkpoints` call
    `on_checkpoint(epoch, net)` (the net in eval mode; training resumes afterwards)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = SmallCNN(channels=images_u8.shape[1])
    optimiser = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    target = torch.as_tensor(y, dtype=torch.float32)
    pos_weight = torch.tensor(float((y == 0).sum()) / max(float((y == 1).sum()), 1.0))
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(order), TRAIN_BATCH):
            rows = order[i:i + TRAIN_BATCH]
            if len(rows) < 2:  # batch norm needs two images
                continue
            x = random_dihedral(to_input(images_u8[rows]), generator)
            loss = F.binary_cross_entropy_with_logits(net(x), target[rows], pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if progress is not None:
            progress.update(1)
        if epoch in checkpoints and on_checkpoint is not None:
            on_checkpoint(epoch, net.eval())
    return net.eval()


def fit_small_cnn(images_u8: torch.Tensor, y: np.ndarray, groups: np.ndarray, *,
                  epochs: tuple[int, ...], folds: int = 5, seed: int = 0,
                  batch: int = 256) -> FittedReference:
    """Choose the epoch count by grouped cross-validation on (images, y, groups); retrain."""
    assert images_u8.dtype == torch.uint8 and images_u8.ndim == 4, images_u8.shape
    y = np.asarray(y, dtype=np.int64)
    splits = grouped_folds(y, np.asarray(groups), folds, seed=seed)
    grid = tuple(sorted(set(int(e) for e in epochs)))
    oof = {e: np.zeros(len(y)) for e in grid}
    total = folds * grid[-1]
    with progress_bar(total=total, unit="epoch", desc="small-cnn cv") as bar:
        for train, held in splits:
            def record(epoch: int, net: SmallCNN, held=held) -> None:
                oof[epoch][held] = CNNScorer(net, batch).decision_function(
                    images_u8[torch.from_numpy(held)])
            train_small_cnn(images_u8[torch.from_numpy(train)], y[train], epochs=grid[-1],
                            seed=seed, checkpoints=grid, on_checkpoint=record, progress=bar)
    cv_auc = {e: roc_auc(y, oof[e]) for e in grid}
    best = max(grid, key=lambda e: (cv_auc[e], -e))
    net = train_small_cnn(images_u8, y, epochs=best, seed=seed)
    return FittedReference(CNNScorer(net, batch), "epochs", best, cv_auc, oof[best], folds)
