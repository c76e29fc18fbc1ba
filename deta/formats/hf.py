"""HuggingFace `DetaForObjectDetection` checkpoints (transformers' DETA port, e.g. jozhang97/deta-resnet-50).

Besides names, HF differs in three ways that matter here:
- attention projections are split: the decoder's self-attention into q/k/v_proj and Swin's qkv
  into query/key/value; we concatenate them back (q, k, v order).
- its config.json, not the weights, says what the model does. `model_args` turns it into our
  main.py arguments; notably HF's two-stage model feeds `two_stage_num_proposals` (default 300)
  proposals to the decoder, where official DETA uses all 900 `num_queries`, so `--num_queries`
  takes the proposal count: outputs then match HF's.
- its class head may have any size (91 COCO category ids for the COCO models, 366 for Objects365).
"""
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..coco_categories import COCO_NUM_CLASSES
from ..errors import ArgumentError, InputError
from ..swin import SWIN_ALIASES, SWIN_VARIANTS, is_swin
from .head_copies import add_head_copies, drop_head_copies
from .rules import RuleTable, StateDict

COPY_PREFIX = "model.decoder."
_BACKBONE = "model.backbone.model."
_RESNET_BLOCK = _BACKBONE + "encoder.stages.{s-1}.layers.{b}."
_OUR_RESNET_BLOCK = "backbone.0.body.layer{s}.{b}."
_SWIN_BLOCK = _BACKBONE + "encoder.layers.{i}.blocks.{j}."
_OUR_SWIN_BLOCK = "backbone.0.body.layers.{i}.blocks.{j}."

RULES = RuleTable([
    # HF's ResNet: embedder = stem, stages.s = torchvision's layer(s+1), layer.k = conv(k+1)/bn(k+1)
    ("backbone.0.body.conv1.weight", _BACKBONE + "embedder.embedder.convolution.weight"),
    ("backbone.0.body.bn1.*", _BACKBONE + "embedder.embedder.normalization.*"),
    (_OUR_RESNET_BLOCK + "conv{k}.weight", _RESNET_BLOCK + "layer.{k-1}.convolution.weight"),
    (_OUR_RESNET_BLOCK + "bn{k}.*", _RESNET_BLOCK + "layer.{k-1}.normalization.*"),
    (_OUR_RESNET_BLOCK + "downsample.0.weight", _RESNET_BLOCK + "shortcut.convolution.weight"),
    (_OUR_RESNET_BLOCK + "downsample.1.*", _RESNET_BLOCK + "shortcut.normalization.*"),
    # HF's Swin: the original code's layout (patch merging closes a stage, see official.py)
    ("backbone.0.body.patch_embed.proj.*", _BACKBONE + "embeddings.patch_embeddings.projection.*"),
    ("backbone.0.body.patch_embed.norm.*", _BACKBONE + "embeddings.norm.*"),
    (_OUR_SWIN_BLOCK + "norm1.*", _SWIN_BLOCK + "layernorm_before.*"),
    (_OUR_SWIN_BLOCK + "attn.proj.*", _SWIN_BLOCK + "attention.output.dense.*"),
    (_OUR_SWIN_BLOCK + "attn.*", _SWIN_BLOCK + "attention.self.*"),  # qkv (fused), relative position bias
    (_OUR_SWIN_BLOCK + "norm2.*", _SWIN_BLOCK + "layernorm_after.*"),
    (_OUR_SWIN_BLOCK + "mlp.fc1.*", _SWIN_BLOCK + "intermediate.dense.*"),
    (_OUR_SWIN_BLOCK + "mlp.fc2.*", _SWIN_BLOCK + "output.dense.*"),
    ("backbone.0.body.layers.{i}.downsample.*", _BACKBONE + "encoder.layers.{i-1}.downsample.*"),
    ("backbone.0.body.norm{n}.*", _BACKBONE + "hidden_states_norms.stage{n+1}.*"),
    ("input_proj.*", "model.input_proj.*"),
    ("transformer.level_embed", "model.level_embed"),
    ("transformer.encoder.layers.{i}.self_attn.*", "model.encoder.layers.{i}.self_attn.*"),
    ("transformer.encoder.layers.{i}.norm1.*", "model.encoder.layers.{i}.self_attn_layer_norm.*"),
    ("transformer.encoder.layers.{i}.linear1.*", "model.encoder.layers.{i}.fc1.*"),
    ("transformer.encoder.layers.{i}.linear2.*", "model.encoder.layers.{i}.fc2.*"),
    ("transformer.encoder.layers.{i}.norm2.*", "model.encoder.layers.{i}.final_layer_norm.*"),
    ("transformer.decoder.layers.{i}.self_attn.*", "model.decoder.layers.{i}.self_attn.*"),
    ("transformer.decoder.layers.{i}.norm2.*", "model.decoder.layers.{i}.self_attn_layer_norm.*"),
    ("transformer.decoder.layers.{i}.cross_attn.*", "model.decoder.layers.{i}.encoder_attn.*"),
    ("transformer.decoder.layers.{i}.norm1.*", "model.decoder.layers.{i}.encoder_attn_layer_norm.*"),
    ("transformer.decoder.layers.{i}.linear1.*", "model.decoder.layers.{i}.fc1.*"),
    ("transformer.decoder.layers.{i}.linear2.*", "model.decoder.layers.{i}.fc2.*"),
    ("transformer.decoder.layers.{i}.norm3.*", "model.decoder.layers.{i}.final_layer_norm.*"),
    ("transformer.enc_output.*", "model.enc_output.*"),
    ("transformer.enc_output_norm.*", "model.enc_output_norm.*"),
    ("transformer.pos_trans.*", "model.pos_trans.*"),
    ("transformer.pos_trans_norm.*", "model.pos_trans_norm.*"),
    ("transformer.pix_trans.*", "model.pix_trans.*"),
    ("transformer.pix_trans_norm.*", "model.pix_trans_norm.*"),
    ("transformer.reference_points.*", "model.reference_points.*"),
    ("query_embed.*", "model.query_position_embeddings.*"),
    ("class_embed.*", "class_embed.*"),
    ("bbox_embed.*", "bbox_embed.*"),
])

# Projections HF splits and we fuse: (where they live, HF's parts in our concatenation order, HF's key of a
# part, our fused key), in `{prefix}`/`{part}`/`{param}` templates that read keys in both directions.
_PROJECTIONS = [
    (r".*\.self_attn\.", ("q", "k", "v"), "{part}_proj.{param}", "in_proj_{param}"),
    (r".*\.attention\.self\.", ("query", "key", "value"), "{part}.{param}", "qkv.{param}"),
]


def _key_pattern(prefix: str, template: str, parts: tuple[str, ...]) -> re.Pattern:
    fields = {"part": "|".join(parts), "param": "weight|bias"}
    pattern = re.escape(template)
    for field, choices in fields.items():
        pattern = pattern.replace(re.escape(f"{{{field}}}"), f"(?P<{field}>{choices})")
    return re.compile(f"(?P<prefix>{prefix}){pattern}")


_SPLIT_KEYS = [(_key_pattern(prefix, split, parts), parts, fused) for prefix, parts, split, fused in _PROJECTIONS]
_FUSED_KEYS = [(_key_pattern(prefix, fused, parts), parts, split) for prefix, parts, split, fused in _PROJECTIONS]

_NO_NAME = "N/A"  # HF's label of class indices without a category, as in its COCO configs
HF_RESNETS = {  # HF ResNetConfig (layer_type, depths, hidden_sizes) of the torchvision ResNets we build
    ("basic", (2, 2, 2, 2), (64, 128, 256, 512)): "resnet18",
    ("basic", (3, 4, 6, 3), (64, 128, 256, 512)): "resnet34",
    ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)): "resnet50",
    ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)): "resnet101",
}
# Defaults of the transformers configs, which config.json leaves out (it stores only what differs).
_DETA_DEFAULTS = {"num_queries": 900, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 2048,
                  "decoder_ffn_dim": 1024, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
                  "d_model": 256, "dropout": 0.1, "num_feature_levels": 5, "encoder_n_points": 4,
                  "decoder_n_points": 4, "two_stage": True, "two_stage_num_proposals": 300, "with_box_refine": True,
                  "assign_first_stage": True, "assign_second_stage": True, "num_labels": 2}
_RESNET_DEFAULTS = {"layer_type": "bottleneck", "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048],
                    "embedding_size": 64, "downsample_in_bottleneck": False, "downsample_in_first_stage": False}
_SWIN_DEFAULTS = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                  "patch_size": 4}


def is_hf(state_dict: Mapping[str, Tensor]) -> bool:
    return any(key.startswith(("model.backbone.model.", "model.level_embed")) for key in state_dict)


def from_hf(state_dict: Mapping[str, Tensor], source: str = "HF checkpoint") -> StateDict:
    """`DetaForObjectDetection` state dict → ours."""
    fused = _fuse_projections(drop_head_copies(state_dict, COPY_PREFIX, source), source)
    return RULES.rename(fused, to_ours=True, source=source)


def _match(key: str, table: list[tuple[re.Pattern, tuple[str, ...], str]]
           ) -> tuple[re.Match, tuple[str, ...], str] | None:
    """(match, parts, the other side's template) of the first pattern in `table` that reads `key`."""
    return next(((found, parts, template) for pattern, parts, template in table
                 if (found := pattern.fullmatch(key))), None)


def _fuse_projections(state_dict: Mapping[str, Tensor], source: str) -> StateDict:
    fused: StateDict = {}
    groups: dict[str, tuple[tuple[str, ...], dict[str, Tensor]]] = {}
    for key, value in state_dict.items():
        split = _match(key, _SPLIT_KEYS)
        if split is None:
            fused[key] = value
            continue
        found, parts, target = split
        name = found["prefix"] + target.format(param=found["param"])
        groups.setdefault(name, (parts, {}))[1][found["part"]] = value
        fused.setdefault(name, value)  # a placeholder, so the fused key takes the place of its first part
    for name, (parts, found_parts) in groups.items():
        missing = [part for part in parts if part not in found_parts]
        if missing:
            raise InputError(f"{source}: {name} cannot be formed, its {'/'.join(missing)} part is missing")
        fused[name] = torch.cat([found_parts[part] for part in parts])
    return fused


def _split_projections(state_dict: Mapping[str, Tensor]) -> StateDict:
    split: StateDict = {}
    for key, value in state_dict.items():
        fused = _match(key, _FUSED_KEYS)
        if fused is None:
            split[key] = value
            continue
        found, parts, template = fused
        for part, chunk in zip(parts, value.chunk(len(parts)), strict=True):
            split[found["prefix"] + template.format(part=part, param=found["param"])] = chunk
    return split


def to_hf(state_dict: Mapping[str, Tensor], two_stage: bool, with_box_refine: bool) -> StateDict:
    """Ours → `DetaForObjectDetection`: HF names, split projections, and the decoder's head copies."""
    renamed = RULES.rename(state_dict, to_ours=False, source="our checkpoint")
    return add_head_copies(_split_projections(renamed), COPY_PREFIX, two_stage, with_box_refine)


def model_args(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Our main.py arguments for the model an HF DETA config.json describes.

    Only what shapes the model or its outputs; training settings keep main.py's values.
    """
    if config.get("model_type") != "deta":
        raise InputError(f"{source}: model_type is {config.get('model_type')!r}, not 'deta'")
    config = {**_DETA_DEFAULTS, **config}
    for encoder_key, decoder_key, argument in [("encoder_ffn_dim", "decoder_ffn_dim", "dim_feedforward"),
                                               ("encoder_attention_heads", "decoder_attention_heads", "nheads")]:
        if config[encoder_key] != config[decoder_key]:
            raise InputError(f"{source}: {encoder_key} {config[encoder_key]} differs from {decoder_key} "
                             f"{config[decoder_key]}; our model has one {argument} for both")
    two_stage = config["two_stage"]
    return {
        "backbone": _backbone_name(config.get("backbone_config") or {"model_type": "resnet"}, source),
        "hidden_dim": config["d_model"], "nheads": config["encoder_attention_heads"],
        "enc_layers": config["encoder_layers"], "dec_layers": config["decoder_layers"],
        "dim_feedforward": config["encoder_ffn_dim"], "dropout": config["dropout"],
        "num_feature_levels": config["num_feature_levels"],
        "enc_n_points": config["encoder_n_points"], "dec_n_points": config["decoder_n_points"],
        "two_stage": two_stage, "with_box_refine": config["with_box_refine"],
        "assign_first_stage": config["assign_first_stage"], "assign_second_stage": config["assign_second_stage"],
        # HF decodes two_stage_num_proposals proposals; its num_queries then only sizes the Stage-2 sampling.
        "num_queries": config["two_stage_num_proposals"] if two_stage else config["num_queries"],
        "num_classes": len(config["id2label"]) if "id2label" in config else config["num_labels"],
    }


def _backbone_name(backbone: Mapping[str, Any], source: str) -> str:
    """Our backbone name for HF's backbone_config; only the backbones we build the same way pass."""
    kind = backbone.get("model_type")
    if kind == "resnet":
        backbone = {**_RESNET_DEFAULTS, **backbone}
        name = HF_RESNETS.get((backbone["layer_type"], tuple(backbone["depths"]), tuple(backbone["hidden_sizes"])))
        if name and backbone["embedding_size"] == 64 and not backbone["downsample_in_bottleneck"] \
                and not backbone["downsample_in_first_stage"]:
            return name
    elif kind == "swin":
        backbone = {**_SWIN_DEFAULTS, **backbone}
        for name, variant in SWIN_VARIANTS.items():  # all with patch size 4
            if backbone["patch_size"] == 4 and all(backbone[key] == (list(value) if isinstance(value, tuple) else value)
                                                   for key, value in variant.items() if key in _SWIN_DEFAULTS):
                return name
    raise InputError(f"{source}: its backbone_config ({kind}) is none of the backbones we build: torchvision's "
                     f"{', '.join(HF_RESNETS.values())} or {', '.join(SWIN_VARIANTS)} (timm)")


def category_names(config: Mapping[str, Any]) -> dict[int, str]:
    """Class index → name from config.json's id2label, less the "N/A" of unused indices."""
    return {int(index): name for index, name in config.get("id2label", {}).items() if name != _NO_NAME}


def config_json(args: Any, names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The config.json of the `DetaForObjectDetection` that runs the model `args` (main.py arguments)
    describe: the inverse of `model_args`. `names` (class index → name) becomes id2label."""
    problems = {name: (value, why) for name, value, why, found in [
        ("dilation", True, "HF's backbones have no dilated stage", getattr(args, "dilation", False)),
        ("position_embedding_scale", args.position_embedding_scale, "HF's is 2π",
         not math.isclose(args.position_embedding_scale, 2 * math.pi)),
        ("num_feature_levels", args.num_feature_levels, "HF feeds the decoder three backbone stages",
         args.num_feature_levels < 2),
    ] if found}
    if problems:
        raise ArgumentError("HF's DETA cannot express " + "; ".join(f"{{{name}}} ({why})"
                                                                    for name, (_, why) in problems.items()),
                            **{name: value for name, (value, _) in problems.items()})
    num_classes = args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES
    names = names or {}
    return {
        "model_type": "deta", "architectures": ["DetaForObjectDetection"],
        "backbone_config": _backbone_config(args.backbone),
        "d_model": args.hidden_dim, "encoder_layers": args.enc_layers, "decoder_layers": args.dec_layers,
        "encoder_attention_heads": args.nheads, "decoder_attention_heads": args.nheads,
        "encoder_ffn_dim": args.dim_feedforward, "decoder_ffn_dim": args.dim_feedforward, "dropout": args.dropout,
        "num_feature_levels": args.num_feature_levels,
        "encoder_n_points": args.enc_n_points, "decoder_n_points": args.dec_n_points,
        "two_stage": args.two_stage, "with_box_refine": args.with_box_refine,
        "assign_first_stage": args.assign_first_stage, "assign_second_stage": args.assign_second_stage,
        # Our decoder runs num_queries queries, which in HF's two-stage model is two_stage_num_proposals.
        "num_queries": args.num_queries, "two_stage_num_proposals": args.num_queries,
        "id2label": {str(index): str(names.get(index, _NO_NAME)) for index in range(num_classes)},
    }


def _backbone_config(backbone: str) -> dict[str, Any]:
    stages = {"out_features": ["stage2", "stage3", "stage4"]}
    resnets = {name: key for key, name in HF_RESNETS.items()}
    if backbone in resnets:
        layer_type, depths, hidden_sizes = resnets[backbone]
        return {"model_type": "resnet", "layer_type": layer_type, "depths": list(depths),
                "hidden_sizes": list(hidden_sizes), "embedding_size": 64, "downsample_in_first_stage": False,
                "downsample_in_bottleneck": False, **stages}
    if is_swin(backbone):
        variant = SWIN_VARIANTS[SWIN_ALIASES.get(backbone, backbone)]
        return {"model_type": "swin", "patch_size": 4, **{key: list(value) if isinstance(value, tuple) else value
                                                          for key, value in variant.items() if key != "model_name"},
                **stages}
    raise ArgumentError("{backbone}: HF's DETA has no such backbone", backbone=backbone)
