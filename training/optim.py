"""The official optimiser: three learning-rate groups chosen by parameter name."""
import argparse

import torch
from torch import nn


def _matches(name: str, keywords: list[str]) -> bool:
    return any(keyword in name for keyword in keywords)


def group_learning_rates(args: argparse.Namespace) -> list[float]:
    """Initial learning rates of the three groups of `param_groups`, in their order."""
    return [args.lr, args.lr_backbone, args.lr * args.lr_linear_proj_mult]


def param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """[rest at --lr, --lr_backbone_names at --lr_backbone, --lr_linear_proj_names at --lr x mult].

    The order is the official one, so optimizer states line up with official checkpoints. A name matching
    both lists goes to the backbone group (the official code would list it twice, which torch rejects).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    backbone = [p for name, p in named if _matches(name, args.lr_backbone_names)]
    linear_proj = [p for name, p in named
                   if _matches(name, args.lr_linear_proj_names) and not _matches(name, args.lr_backbone_names)]
    rest = [p for name, p in named
            if not _matches(name, args.lr_backbone_names) and not _matches(name, args.lr_linear_proj_names)]
    return [{"params": params, "lr": lr}
            for params, lr in zip((rest, backbone, linear_proj), group_learning_rates(args), strict=True)]


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9 under --sgd; weight decay on every group, as in the official code."""
    groups = param_groups(model, args)
    if args.sgd:
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
