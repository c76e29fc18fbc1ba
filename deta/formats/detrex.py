"""detrex DETA checkpoints (IDEA-Research/detrex, projects/deta).

The architecture is the official one under other names: a detectron2 ResNet or Swin, a
ChannelMapper neck (= our input projections), detrex's generic transformer layers. Two things
differ in content:
- detrex classifies 80 contiguous COCO classes, we (like the official code) 91 rows indexed by
  COCO category id. Decoder head row i is our row COCO_CATEGORY_IDS[i]; the encoder (proposal)
  head, which only uses row 0 as objectness, keeps its first 80 rows (as detrex's converter cut
  them). Our rows without a detrex row get weight 0 and bias −100, a probability of 0, so they
  never displace a real class among the detections. Heads of any other size are kept as they are.
- Its non-NMS evaluation keeps 300 detections per image (`select_box_nums_for_evaluation`); the
  NMS evaluation of DETA keeps 100, like ours. docs/MODEL_ZOO.md gives the flags.
Its sine position encoding uses offset −0.5 in the DETA configs, the same as ours.
"""
from collections.abc import Mapping

import torch
from torch import Tensor

from ..coco_categories import COCO_CATEGORY_NAMES
from .head_copies import add_head_copies, drop_head_copies
from .rules import RuleTable, StateDict

COCO_CATEGORY_IDS = tuple(sorted(COCO_CATEGORY_NAMES))
"""The 80 category ids COCO uses, in detectron2's contiguous order."""
COCO_NUM_IDS = 91
_MISSING_CLASS_BIAS = -100.0

COPY_PREFIX = "transformer.decoder."

RULES = RuleTable([
    # detectron2 ResNet with FrozenBN: stem, then res2..res5 = torchvision's layer1..layer4
    ("backbone.0.body.conv1.weight", "backbone.stem.conv1.weight"),
    ("backbone.0.body.bn1.*", "backbone.stem.conv1.norm.*"),
    ("backbone.0.body.layer{s}.{b}.conv{k}.weight", "backbone.res{s+1}.{b}.conv{k}.weight"),
    ("backbone.0.body.layer{s}.{b}.bn{k}.*", "backbone.res{s+1}.{b}.conv{k}.norm.*"),
    ("backbone.0.body.layer{s}.{b}.downsample.0.weight", "backbone.res{s+1}.{b}.shortcut.weight"),
    ("backbone.0.body.layer{s}.{b}.downsample.1.*", "backbone.res{s+1}.{b}.shortcut.norm.*"),
    # detectron2 Swin: the original code's layout (patch merging closes a stage, see official.py)
    ("backbone.0.body.patch_embed.*", "backbone.patch_embed.*"),
    ("backbone.0.body.layers.{i}.blocks.*", "backbone.layers.{i}.blocks.*"),
    ("backbone.0.body.layers.{i}.downsample.*", "backbone.layers.{i-1}.downsample.*"),
    ("backbone.0.body.norm{n}.*", "backbone.norm{n}.*"),
    # ChannelMapper: one conv per backbone map (3 of them), then the extra stride-2 levels
    ("input_proj.{l+3}.0.*", "neck.extra_convs.{l}.conv.*"),
    ("input_proj.{l+3}.1.*", "neck.extra_convs.{l}.norm.*"),
    ("input_proj.{l}.0.*", "neck.convs.{l}.conv.*"),
    ("input_proj.{l}.1.*", "neck.convs.{l}.norm.*"),
    ("transformer.level_embed", "transformer.level_embeds"),
    ("transformer.encoder.layers.{i}.self_attn.*", "transformer.encoder.layers.{i}.attentions.0.*"),
    ("transformer.encoder.layers.{i}.norm{n}.*", "transformer.encoder.layers.{i}.norms.{n-1}.*"),
    ("transformer.encoder.layers.{i}.linear1.*", "transformer.encoder.layers.{i}.ffns.0.layers.0.0.*"),
    ("transformer.encoder.layers.{i}.linear2.*", "transformer.encoder.layers.{i}.ffns.0.layers.1.*"),
    ("transformer.decoder.layers.{i}.self_attn.*", "transformer.decoder.layers.{i}.attentions.0.attn.*"),
    ("transformer.decoder.layers.{i}.cross_attn.*", "transformer.decoder.layers.{i}.attentions.1.*"),
    # detrex numbers a decoder layer's norms in the order they run: self-attention, cross-attention, FFN.
    ("transformer.decoder.layers.{i}.norm2.*", "transformer.decoder.layers.{i}.norms.0.*"),
    ("transformer.decoder.layers.{i}.norm1.*", "transformer.decoder.layers.{i}.norms.1.*"),
    ("transformer.decoder.layers.{i}.norm3.*", "transformer.decoder.layers.{i}.norms.2.*"),
    ("transformer.decoder.layers.{i}.linear1.*", "transformer.decoder.layers.{i}.ffns.0.layers.0.0.*"),
    ("transformer.decoder.layers.{i}.linear2.*", "transformer.decoder.layers.{i}.ffns.0.layers.1.*"),
    ("transformer.enc_output.*", "transformer.enc_output.*"),
    ("transformer.enc_output_norm.*", "transformer.enc_output_norm.*"),
    ("transformer.pos_trans.*", "transformer.pos_trans.*"),
    ("transformer.pos_trans_norm.*", "transformer.pos_trans_norm.*"),
    ("transformer.pix_trans.*", "transformer.pix_trans.*"),
    ("transformer.pix_trans_norm.*", "transformer.pix_trans_norm.*"),
    ("transformer.reference_points.*", "transformer.reference_points.*"),
    ("query_embed.*", "query_embedding.*"),
    ("class_embed.*", "class_embed.*"),
    ("bbox_embed.*", "bbox_embed.*"),
])


def is_detrex(state_dict: Mapping[str, Tensor]) -> bool:
    return "transformer.level_embeds" in state_dict or any(key.startswith("neck.") for key in state_dict)


def from_detrex(state_dict: Mapping[str, Tensor], source: str = "detrex checkpoint") -> StateDict:
    """detrex state dict → ours, with 80-row COCO class heads spread onto the 91 category-id rows."""
    renamed = RULES.rename(drop_head_copies(state_dict, COPY_PREFIX, source), to_ours=True, source=source)
    return _map_class_rows(renamed, to_ours=True)


def to_detrex(state_dict: Mapping[str, Tensor], two_stage: bool, with_box_refine: bool) -> StateDict:
    """Ours → detrex, with 91-row COCO class heads cut to detrex's 80 rows."""
    renamed = RULES.rename(_map_class_rows(state_dict, to_ours=False), to_ours=False, source="our checkpoint")
    return add_head_copies(renamed, COPY_PREFIX, two_stage, with_box_refine)


def _map_class_rows(state_dict: Mapping[str, Tensor], to_ours: bool) -> StateDict:
    """COCO class heads between detrex's 80 rows and our 91 (see the module docstring)."""
    heads = sorted({int(key.split(".")[1]) for key in state_dict if key.startswith("class_embed.")})
    encoder_head = heads[-1] if "transformer.enc_output.weight" in state_dict else None
    mapped = dict(state_dict)
    for head in heads:
        rows = (torch.tensor(COCO_CATEGORY_IDS) if head != encoder_head else torch.arange(len(COCO_CATEGORY_IDS)))
        for name in ("weight", "bias"):
            key = f"class_embed.{head}.{name}"
            value = state_dict[key]
            if to_ours and len(value) == len(COCO_CATEGORY_IDS):
                fill = _MISSING_CLASS_BIAS if name == "bias" else 0.0
                mapped[key] = value.new_full((COCO_NUM_IDS, *value.shape[1:]), fill).index_copy(0, rows, value)
            elif not to_ours and len(value) == COCO_NUM_IDS:
                mapped[key] = value[rows]
    return mapped
