"""Shared helpers for tests over torchvision models: export to ONNX with non-degenerate weights."""
from __future__ import annotations

import os
import warnings

import numpy as np

# models too big for the default CI run (memory/time on 2 cores): they run under -m slow
HEAVY = {
    "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf",
    "regnet_x_16gf", "efficientnet_b7", "efficientnet_b6", "efficientnet_v2_l", "convnext_large",
    "swin_v2_b", "swin_b", "vit_b_16", "resnext101_64x4d", "resnext101_32x8d", "wide_resnet101_2",
    "vgg19_bn", "vgg19", "vgg16_bn", "vgg16", "vgg13", "vgg13_bn", "convnext_base", "maxvit_t",
    "efficientnet_b5", "efficientnet_v2_m", "swin_v2_s", "densenet201", "densenet161", "regnet_y_8gf",
    "regnet_x_8gf", "resnet152", "swin_s",
}
TRANSFORMERS = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b",
                "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"}


def input_size(name: str) -> int:
    if name == "inception_v3":
        return 299
    if name == "vit_h_14":
        return 224
    return 224


def make_model(name: str, seed: int = 0):
    """A torchvision model in eval mode with random but well-scaled BN statistics."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def export(name: str, directory: str, seed: int = 0, fold: bool = True) -> str:
    import torch

    path = os.path.join(directory, f"{name}{'' if fold else '_nofold'}.onnx")
    if os.path.exists(path):
        return path
    model = make_model(name, seed)
    size = input_size(name)
    x = torch.randn(1, 3, size, size)
    big = sum(p.numel() for p in model.parameters()) * 4 > 1.8e9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, do_constant_folding=fold,
                          external_data=big)
    return path


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
