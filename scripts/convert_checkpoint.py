"""Convert a DETA checkpoint between formats, checking every tensor against the model it belongs to.

    python scripts/convert_checkpoint.py --from official IN.pth OUT.pth [-- MAIN_PY_FLAGS...]

The architecture comes from the arguments saved in the checkpoint (official checkpoints carry
their argparse Namespace); main.py flags after `--` override them, and are required when the
file has none. Nothing is written unless every key and shape fits.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deta
from deta.checkpoint import FORMATS, load_checkpoint, save_atomically, state_dict_problems, to_official
from deta.errors import InputError
from main import get_args_parser


def model_args(saved_args: argparse.Namespace | dict | None, overrides: list[str]) -> argparse.Namespace:
    """Our main.py arguments: parser defaults, then the checkpoint's saved values, then `overrides`."""
    parser = get_args_parser()
    args = parser.parse_args([])
    saved = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else dict(saved_args or {})
    for key, value in saved.items():
        if hasattr(args, key):
            setattr(args, key, value)
    args = parser.parse_args(overrides, namespace=args)
    args.device = "cpu"
    args.pretrained_backbone = "none"
    return args


def convert(source: str, target: str, source_format: str, target_format: str, overrides: list[str]) -> None:
    checkpoint = load_checkpoint(source, source_format)
    if checkpoint.get("args") is None and not overrides:
        raise InputError(f"checkpoint {source}: it saves no model arguments; pass the main.py model flags after "
                         "'--' (e.g. -- --two_stage --with_box_refine --num_feature_levels 5 ...)")
    args = model_args(checkpoint.get("args"), overrides)
    model, _, _ = deta.build_model(args)
    problems = state_dict_problems(model, checkpoint["model"])
    if problems:
        raise InputError(f"checkpoint {source} does not fit the model of its arguments: " + "; ".join(problems))
    state_dict = checkpoint["model"]
    if target_format == "official":
        state_dict = to_official(state_dict, args.two_stage, args.with_box_refine)
    save_atomically({**checkpoint, "model": state_dict, "args": args}, target)
    print(f"wrote {target}: {len(state_dict)} tensors ({target_format} format)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source_format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument("--to", dest="target_format", default="deta", choices=FORMATS)
    parser.add_argument("input")
    parser.add_argument("output")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser.epilog = "main.py flags after '--' override the model arguments saved in the checkpoint"
    options = parser.parse_args(argv[:split])
    overrides = argv[split + 1:]
    try:
        convert(options.input, options.output, options.source_format, options.target_format, overrides)
    except InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
