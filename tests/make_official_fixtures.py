"""Write tests/data/official_*.pt: the official DETA's outputs on the parity fixture, for tests/test_official_parity.py
and tests/test_swin.py.

    python tests/make_official_fixtures.py --official PATH/TO/jozhang97/DETA [--configs tiny full swin_shallow ...]

Runs the official code (jozhang97/DETA f47e50e, unmodified, from a checkout at --official) on the CPU: its CUDA
attention extension is replaced by its own PyTorch path (`ms_deform_attn_core_pytorch`), its backbones are
built without downloading weights, and every floating-point parameter is set by
`official_fixture.perturbed_state_dict(seed=0)`. Each fixture holds, for one padded batch of the two images of
`official_fixture.make_images(0)` and for each image alone: the final and auxiliary predictions, the encoder's
objectness and boxes for every token, the tokens the official proposal selection chose, and the official
NMS post-processing's detections.

Run it in its own environment: the official code's top-level packages (models, util, datasets) would shadow
ours, so this file puts the official checkout first on the path and imports nothing of this repository but
official_fixture.py.
"""
import argparse
import math
import sys
import types
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
OUT = TESTS / "data"
sys.path.insert(0, str(TESTS))

from official_fixture import FULL_FLAGS, TINY_FLAGS, chosen_tokens, make_images, perturbed_state_dict  # noqa: E402

SWIN_FLAGS = [*TINY_FLAGS, "--backbone", "swin", "--bigger"]
CONFIGS = {  # name: (flags, Swin depths or None)
    "tiny": (TINY_FLAGS, None),
    "full": (FULL_FLAGS, None),
    "swin_shallow": (SWIN_FLAGS, [2, 2, 2, 2]),
    "swin_full": (SWIN_FLAGS, [2, 2, 18, 2]),
}
# Auxiliary logits of every decoder layer are stored where they stay small (the full config's would take 5 MB).
MAX_AUX_LOGITS = 100_000


def import_official(root: Path) -> types.SimpleNamespace:
    """The official modules, with the CUDA extension served by the official PyTorch attention path."""
    sys.path.insert(0, str(root))
    extension = types.ModuleType("MultiScaleDeformableAttention")
    sys.modules["MultiScaleDeformableAttention"] = extension
    from models.ops.functions import ms_deform_attn_func

    def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations,
                                                              attention_weights)

    extension.ms_deform_attn_forward = forward
    import models
    from models import backbone, deformable_transformer, swin
    from util.misc import nested_tensor_from_tensor_list

    import main as official_main
    backbone.is_main_process = lambda: False  # pretrained=False: no ImageNet download
    deformable_transformer.DeformableTransformer.get_proposal_pos_embed = proposal_position_embedding
    # get_swinl without its ImageNet weight file (the fixture sets every weight)
    backbone.get_swinl = lambda **kwargs: swin.SwinTransformer(**swin.swin_l_kwargs, **kwargs)
    return types.SimpleNamespace(main=official_main, models=models, swin=swin, nest=nested_tensor_from_tensor_list)


def proposal_position_embedding(self, proposals: torch.Tensor) -> torch.Tensor:
    """The official `get_proposal_pos_embed` with its 128 features per coordinate (right for d_model 256)
    generalised to d_model / 2, so that the small configurations run; identical at d_model 256."""
    num_pos_feats = self.d_model // 2
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    pos = (proposals.sigmoid() * 2 * math.pi)[:, :, :, None] / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


def build(official: types.SimpleNamespace, flags: list[str], depths: list[int] | None) -> tuple:
    args = official.main.get_args_parser().parse_args([*flags])
    if depths is not None:
        official.swin.swin_l_kwargs["depths"] = depths
        official.swin.swin_l_kwargs["use_checkpoint"] = False
    model, _, postprocessors = official.models.build_model(args)
    state = model.state_dict()
    floats = {key: tuple(value.shape) for key, value in state.items() if value.is_floating_point()}
    state.update(perturbed_state_dict(floats, seed=0))
    model.load_state_dict(state)
    return model.eval(), postprocessors["bbox"], {key: list(value.shape) for key, value in state.items()}


def run(official: types.SimpleNamespace, model, postprocess, images: list[torch.Tensor]) -> dict:
    samples = official.nest(images)
    captured = {}

    def record_shapes(module, args) -> None:  # a pre-hook that returned a value would replace the arguments
        captured["spatial_shapes"] = args[1].tolist()

    hook = model.transformer.encoder.register_forward_pre_hook(record_shapes)
    with torch.no_grad():
        out = model(samples)
    hook.remove()
    spatial_shapes = captured["spatial_shapes"]
    enc = out["enc_outputs"]
    assert sum(h * w for h, w in spatial_shapes) == enc["pred_logits"].shape[1], spatial_shapes
    sizes = torch.tensor([list(image.shape[-2:]) for image in images])
    aux_logits = torch.stack([aux["pred_logits"] for aux in out["aux_outputs"]])
    result = {
        "spatial_shapes": spatial_shapes,
        "pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"], "init_reference": out["init_reference"],
        "aux_pred_boxes": torch.stack([aux["pred_boxes"] for aux in out["aux_outputs"]]),
        "enc_logits": enc["pred_logits"][..., 0], "enc_boxes": enc["pred_boxes"], "enc_anchors": enc["anchors"],
        "selected": chosen_tokens(out["init_reference"], enc["pred_boxes"]),
        "detections": postprocess(out, sizes),
    }
    if aux_logits.numel() <= MAX_AUX_LOGITS:
        result["aux_pred_logits"] = aux_logits
    return own_storage(result)


def own_storage(value):
    """`value` with every tensor copied out of its storage: torch.save writes the whole storage of a view."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: own_storage(item) for key, item in value.items()}
    if isinstance(value, list):
        return [own_storage(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of jozhang97/DETA")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    options = parser.parse_args()
    official = import_official(options.official.resolve())
    images = make_images(0)
    for name in options.configs:
        flags, depths = CONFIGS[name]
        torch.manual_seed(0)
        model, postprocess, shapes = build(official, flags, depths)
        fixture = {"flags": flags, "seed": 0, "image_sizes": [list(image.shape[-2:]) for image in images],
                   "state_dict_shapes": shapes, "padded": run(official, model, postprocess, images),
                   "single_image": [run(official, model, postprocess, [image]) for image in images]}
        if depths is not None:
            fixture["depths"] = depths
        torch.save(fixture, OUT / f"official_{name}.pt")
        print(f"wrote {OUT / f'official_{name}.pt'}")


if __name__ == "__main__":
    main()
