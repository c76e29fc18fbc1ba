"""Deterministic inputs and weights shared by the official-DETA harness and our parity tests.

tests/make_official_fixtures.py builds the official model with ``TINY_FLAGS`` / ``FULL_FLAGS``,
fills it with :func:`perturbed_state_dict`, runs it on :func:`make_images` and stores the outputs
under ``tests/data/official_*.pt``. Our tests build the re-implementation, load the same
(converted) weights and compare.

Nothing here imports official code.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

_DETA_SH_FLAGS = ["--with_box_refine", "--two_stage", "--num_feature_levels", "5", "--dropout", "0.0",
                  "--cls_loss_coef", "1.0", "--assign_first_stage", "--assign_second_stage", "--backbone", "resnet50",
                  "--device", "cpu"]

FULL_FLAGS: list[str] = [*_DETA_SH_FLAGS, "--num_queries", "900", "--dim_feedforward", "2048"]
"""Model flags of the official ``configs/deta.sh`` (R50, 900 queries, 6+6 layers, d=256)."""

TINY_FLAGS: list[str] = [*_DETA_SH_FLAGS, "--num_queries", "60", "--dim_feedforward", "128", "--enc_layers", "2",
                         "--dec_layers", "2", "--hidden_dim", "64", "--nheads", "4"]
"""A small but complete DETA: same code paths as ``FULL_FLAGS``, 2+2 layers, d=64, 60 queries."""

IMAGE_SIZES: tuple[tuple[int, int], ...] = ((256, 320), (224, 352))
"""(H, W) of the two test images; different in both axes so the batch is padded in H and W."""

# Keys that alias the same tensor in the official model (``transformer.decoder.class_embed`` is
# ``class_embed``); both spellings are seeded by the short name so aliases get identical values.
_ALIAS_PREFIX = re.compile(r"^transformer\.decoder\.(?=(class_embed|bbox_embed)\.)")
_INTEGER_BUFFERS = ("num_batches_tracked",)


def make_images(seed: int = 0) -> list[torch.Tensor]:
    """Two ImageNet-normalised-looking float32 images of sizes :data:`IMAGE_SIZES`.

    Each image is smooth low-frequency structure plus pixel noise, drawn from a local generator.
    """
    gen = torch.Generator().manual_seed(seed)
    images = []
    for h, w in IMAGE_SIZES:
        coarse = torch.randn(1, 3, h // 32, w // 32, generator=gen)
        smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        noise = torch.randn(3, h, w, generator=gen)
        images.append((smooth + 0.3 * noise).to(torch.float32).contiguous())
    return images


def _canonical_name(key: str) -> str:
    """Name used to seed ``key``: aliased head keys map to their short spelling."""
    return _ALIAS_PREFIX.sub("", key)


def _generator(name: str, seed: int) -> torch.Generator:
    """A generator whose state depends only on (name, seed)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def _perturbed_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Value for one floating-point entry, chosen from its (canonical) name and shape."""

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * (high - low) + low

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return uniform(0.5, 1.5)
    if leaf == "running_mean":
        return normal(0.1)
    if name.endswith("level_embed"):
        return normal(1.0)
    if name.endswith("sampling_offsets.bias"):
        return uniform(-4.0, 4.0)
    if name.endswith("attention_weights.bias"):
        return normal(0.5)
    if "class_embed" in name and leaf == "bias":
        return normal(0.3, mean=-2.0)
    is_box_delta = "bbox_embed" in name and len(shape) >= 1 and shape[0] == 4
    if leaf == "bias" or len(shape) <= 1:
        if leaf == "weight":  # 1-D weight: FrozenBN / GroupNorm / LayerNorm scale
            return normal(0.1, mean=1.0)
        return normal(0.1 if is_box_delta else 0.05)
    fan_in = math.prod(shape[1:])
    gain = 1.0
    if is_box_delta:
        gain = 0.2
    elif name.endswith("sampling_offsets.weight"):
        gain = 0.5
    return normal(gain / math.sqrt(fan_in))


def perturbed_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for every key of ``shapes``.

    Each value depends only on (key name, shape, seed), never on key order. Every layer that
    the official code zero-initialises gets non-zero values, so all code paths carry signal:
    weights ~ N(0, 1/fan_in); norm scales ~ 1 + N(0, 0.1); biases small; FrozenBN running_var in
    [0.5, 1.5]; ``sampling_offsets.bias`` in [-4, 4]; class biases ~ -2; box-delta layers scaled
    down. Keys ``transformer.decoder.{class,bbox}_embed.*`` receive the same values as their
    aliases ``{class,bbox}_embed.*``. Integer buffers (``num_batches_tracked``) are skipped; the
    caller must pass floating-point entries only.
    """
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.rsplit(".", 1)[-1] in _INTEGER_BUFFERS:
            continue
        name = _canonical_name(key)
        shape = tuple(int(s) for s in shape)
        out[key] = _perturbed_value(name, shape, _generator(name, seed)).to(torch.float32)
    return out


def chosen_tokens(init_reference: Tensor, enc_boxes: Tensor) -> Tensor:
    """(B, Q) token index of each query, from a two-stage model's outputs: init_reference is its enc_boxes
    gathered at the chosen tokens (the sigmoid of the same values, equal up to the rounding of vectorised and
    scalar sigmoid).

    Tokens with equal boxes (the +inf boxes of padding and invalid proposals, whose features are equal too)
    are interchangeable; the first is taken.
    """
    distance = (init_reference[:, :, None, :] - enc_boxes[:, None, :, :]).abs().amax(-1)  # (B, Q, S)
    best = distance.argmin(-1)
    assert distance.amin(-1).max() < 1e-6, "a query matches no encoder token"
    best_boxes = torch.gather(enc_boxes, 1, best[..., None].expand(-1, -1, 4))
    near = distance < 1e-6
    same_box = (enc_boxes[:, None, :, :] == best_boxes[:, :, None, :]).all(-1)
    assert not (near & ~same_box).any(), "a query matches two different encoder boxes"
    return best
