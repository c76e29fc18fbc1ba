"""Train and evaluate DETA.

Flag names follow the official DETA / Deformable-DETR `main.py`, so existing command lines
(e.g. configs/deta.sh) keep working. Launch with `python main.py ...` on one process or
`torchrun --nproc_per_node=N main.py ...` for data-parallel training.
"""
import argparse
import math


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DETA training and evaluation", add_help=False)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", default=2e-4, type=float)
    opt.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    opt.add_argument("--lr_backbone", default=2e-5, type=float)
    opt.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"],
                     type=str, nargs="+")
    opt.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    opt.add_argument("--batch_size", default=2, type=int, help="images per process")
    opt.add_argument("--weight_decay", default=1e-4, type=float)
    opt.add_argument("--epochs", default=50, type=int)
    opt.add_argument("--lr_drop", default=40, type=int, help="epochs between 10x learning-rate drops")
    opt.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)")
    opt.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of AdamW")
    opt.add_argument("--amp", action="store_true", help="bf16 autocast where the device supports it")

    model = parser.add_argument_group("model")
    model.add_argument("--with_box_refine", action="store_true")
    model.add_argument("--two_stage", action="store_true")
    model.add_argument("--backbone", default="resnet50", type=str,
                       help="resnet18, resnet34, resnet50 or resnet101 (torchvision)")
    model.add_argument("--pretrained_backbone", default="default", type=str,
                       help="'default': torchvision's ImageNet weights from its cache, 'none': random "
                            "initialisation, or the path of a backbone state dict")
    model.add_argument("--dilation", action="store_true",
                       help="replace the stride of the last ResNet stage with dilation (DC5)")
    model.add_argument("--position_embedding", default="sine", choices=("sine",))
    model.add_argument("--position_embedding_scale", default=2 * math.pi, type=float,
                       help="position / size * scale")
    model.add_argument("--num_feature_levels", default=4, type=int)
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=1024, type=int)
    model.add_argument("--hidden_dim", default=256, type=int)
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_queries", default=300, type=int)
    model.add_argument("--dec_n_points", default=4, type=int)
    model.add_argument("--enc_n_points", default=4, type=int)
    model.add_argument("--num_classes", default=None, type=int,
                       help="size of the class head; default: largest category id + 1 of the training "
                            "annotations when training, else 91 (COCO category ids)")

    loss = parser.add_argument_group("assignment and loss")
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="disable the per-decoder-layer and encoder losses")
    loss.add_argument("--assign_first_stage", action="store_true",
                      help="IoU (RPN-style) assignment for the encoder proposals instead of Hungarian")
    loss.add_argument("--assign_second_stage", action="store_true",
                      help="IoU one-to-many assignment for the decoder, and NMS post-processing")
    loss.add_argument("--set_cost_class", default=2, type=float)
    loss.add_argument("--set_cost_bbox", default=5, type=float)
    loss.add_argument("--set_cost_giou", default=2, type=float)
    loss.add_argument("--cls_loss_coef", default=2, type=float)
    loss.add_argument("--bbox_loss_coef", default=5, type=float)
    loss.add_argument("--giou_loss_coef", default=2, type=float)
    loss.add_argument("--focal_alpha", default=0.25, type=float)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_file", default="coco", choices=("coco",))
    data.add_argument("--coco_path", default=None, type=str,
                      help="COCO root with train2017/, val2017/ and annotations/")
    data.add_argument("--train_json", default=None, type=str, help="COCO-format training annotations")
    data.add_argument("--train_images", default=None, type=str, help="folder of the training images")
    data.add_argument("--val_json", default=None, type=str, help="COCO-format validation annotations")
    data.add_argument("--val_images", default=None, type=str, help="folder of the validation images")
    data.add_argument("--train_sizes", default="480,512,544,576,608,640,672,704,736,768,800", type=str,
                      help="comma-separated shorter-side sizes for multi-scale training")
    data.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    data.add_argument("--eval_size", default=800, type=int, help="shorter side at evaluation")
    data.add_argument("--bigger", action="store_true",
                      help="Swin-L recipe: scales x1.5 and max size 2000 (crop branch unchanged)")
    data.add_argument("--num_workers", default=2, type=int)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="", help="where to save checkpoints and logs; empty: nowhere")
    run.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available")
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="",
                     help="continue a run: model, optimizer, scheduler and epoch from a checkpoint")
    run.add_argument("--finetune", default="",
                     help="start from a checkpoint's weights only; class heads of another size are dropped")
    run.add_argument("--start_epoch", default=0, type=int)
    run.add_argument("--eval", action="store_true", help="evaluate only")
    run.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    return parser
