"""The model, its criterion and its post-processing, built from the model's arguments (deta.config)."""
import argparse

import torch
from torch import nn

from .backbone import Joiner, ResNetBackbone, load_pretrained_backbone
from .coco_categories import COCO_NUM_CLASSES
from .criterion import build_criterion
from .detector import DETA
from .position_encoding import PositionEmbeddingSine
from .postprocess import NMSPostProcess, PostProcess
from .swin import SwinBackbone, is_swin
from .transformer import DeformableTransformer


def build_backbone(args: argparse.Namespace) -> Joiner:
    train_backbone = args.lr_backbone > 0
    if is_swin(args.backbone):
        backbone = SwinBackbone(args.backbone, train_backbone, args.pretrained_backbone)
    else:
        backbone = ResNetBackbone(args.backbone, train_backbone, multi_scale=args.num_feature_levels > 1,
                                  dilation=args.dilation)
        load_pretrained_backbone(backbone, args.backbone, args.pretrained_backbone)
    return Joiner(backbone, PositionEmbeddingSine(args.hidden_dim // 2, scale=args.position_embedding_scale))


def build_transformer(args: argparse.Namespace) -> DeformableTransformer:
    return DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points,
        two_stage=args.two_stage, two_stage_num_proposals=args.num_queries, proposal_nms=args.assign_first_stage)


def build_model(args: argparse.Namespace) -> tuple[DETA, nn.Module, dict[str, nn.Module]]:
    """Model, criterion and post-processors from the model's arguments (`deta.config`, main.py's flags)."""
    num_classes = args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES
    model = DETA(build_backbone(args), build_transformer(args), num_classes=num_classes,
                 num_queries=args.num_queries, num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                 with_box_refine=args.with_box_refine, two_stage=args.two_stage,
                 pad_in_training=args.official_batching or args.train_batching == "padded",
                 pad_in_inference=args.official_batching or args.eval_batching == "padded")
    criterion = build_criterion(args, num_classes)
    # Detections kept per image: 100 (official); detrex's non-NMS evaluation keeps 300 (docs/MODEL_ZOO.md).
    postprocess = (NMSPostProcess if args.assign_second_stage else PostProcess)(num_detections=args.num_detections)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device), criterion.to(device), {"bbox": postprocess}
