"""sklearn's 8x8 digits as a small offline image task: upsampled, standardised, split by class."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Split:
    x: torch.Tensor  # (N, 1, S, S) float32
    y: torch.Tensor  # (N,) int64


def load_digits_split(size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """Stratified train/test split; images bilinearly upsampled to size x size and standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                      stratify=d.target)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    return Split(x[idx_tr], y[idx_tr]), Split(x[idx_te], y[idx_te])


def trained_resnet20(epochs: int, size: int = 16):
    """ResNet-20 (benchmarks/cifar_resnet.py) trained from seed 0 on the digits split, in eval mode.

    Returns (model, train split, test split, test accuracy, training seconds): the small task the
    accuracy benchmarks prune.
    """
    import time

    from cifar_resnet import resnet20
    from graphprune.passes.training import TrainConfig, evaluate, train

    torch.manual_seed(0)
    tr, te = load_digits_split(size)
    model = resnet20()
    t = time.perf_counter()
    train(model, tr.x, tr.y, TrainConfig(epochs=epochs, lr=0.1, progress=False), seed=0)
    model.eval()
    return model, tr, te, evaluate(model, te.x, te.y, "cpu"), time.perf_counter() - t
