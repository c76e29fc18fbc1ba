"""Convert a DETA checkpoint between formats, checking every tensor against the model it belongs to.

    python scripts/convert_checkpoint.py [--from auto|deta|official|detrex|hf] [--to deta|official|detrex|hf]
        [--no_ema] IN OUT [-- MAIN_PY_FLAGS...]

IN is a checkpoint file or an HF model folder, by path, http(s) URL or model-zoo name (docs/MODEL_ZOO.md);
with `--to hf`, OUT is a folder that receives
model.safetensors and config.json (transformers 4.x `DetaForObjectDetection.from_pretrained` loads it;
class names saved in the checkpoint become id2label). The architecture comes from the arguments saved
with the checkpoint (official: its argparse Namespace; ours: main.py's; HF: config.json beside the
weights); main.py flags after `--` override them, and are required where there are none (detrex).
Nothing is written unless every key maps and every shape fits. docs/MODEL_ZOO.md gives the
commands for each published checkpoint.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deta
from deta.checkpoint import (
    HF_FOLDER_FILES,
    SOURCE_FORMATS,
    TARGET_FORMATS,
    describe,
    from_ours,
    input_file_at,
    load_checkpoint,
    save_atomically,
    save_hf_folder,
    state_dict_problems,
)
from deta.config import checkpoint_args, model_flags
from deta.errors import InputError, NoSpaceError, command_line_message
from deta.formats.hf import config_json


def convert(source: str, target: str, source_format: str, target_format: str, overrides: list[str],
            use_ema: bool = True) -> None:
    _refuse_to_overwrite(Path(source), Path(target), target_format)
    checkpoint = load_checkpoint(source, source_format)
    if target_format != "deta" and "ema" in checkpoint:  # other code bases hold one set of weights
        ema = checkpoint.pop("ema")
        if use_ema:
            checkpoint["model"] = ema["model"]
            print(f"{source}: converting its EMA weights (the moving average of {ema['updates']} training steps); "
                  "--no_ema converts the trained weights")
    args = checkpoint_args(checkpoint, f"checkpoint {source}", model_flags(overrides))
    args.device = "cpu"
    model, _, _ = deta.build_model(args)
    problems = state_dict_problems(model, checkpoint["model"])
    if problems:
        raise InputError(f"checkpoint {source} does not fit the model of its arguments ({describe(problems, 20)})")
    if target_format == "hf":  # the config first: it refuses what HF cannot express, before anything is written
        config = config_json(args, checkpoint.get("category_names"))
        save_hf_folder(from_ours(checkpoint["model"], "hf", args.two_stage, args.with_box_refine), config, target)
        print(f"wrote {target}: model.safetensors and config.json (HF format)")
        return
    state_dict = from_ours(checkpoint["model"], target_format, args.two_stage, args.with_box_refine)
    # detrex files hold the weights alone: its loader would refuse our pickled arguments.
    contents = {"model": state_dict} if target_format == "detrex" else {**checkpoint, "model": state_dict,
                                                                        "args": args}
    save_atomically(contents, target)
    print(f"wrote {target}: {len(state_dict)} tensors ({target_format} format)")


def _refuse_to_overwrite(source: Path, target: Path, target_format: str) -> None:
    """The output must not replace what is read: a training checkpoint converted in place would lose its
    optimizer, schedule, epoch and RNG state (detrex), or be replaced before the conversion is checked.
    Compared as files, so symbolic and hard links count."""
    written = [target, *(target / name for name in HF_FOLDER_FILES)] if target_format == "hf" else [target]
    for out in written:
        same = input_file_at(out, source)
        if same is not None:
            link = "" if out.absolute() == same.absolute() else ", through a link"
            raise InputError(f"{target}: the output is the input {same} (the same file{link}); converting would "
                             "overwrite what it reads, pass another output path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source_format", default="auto", choices=("auto", *SOURCE_FORMATS))
    parser.add_argument("--to", dest="target_format", default="deta", choices=TARGET_FORMATS)
    parser.add_argument("--no_ema", dest="use_ema", action="store_false",
                        help="to another format, the trained weights of a main.py --ema checkpoint rather than "
                             "(the default) their average; our format keeps both")
    parser.add_argument("input", help="checkpoint file, or HF model folder")
    parser.add_argument("output")
    parser.epilog = "main.py flags after '--' override the model arguments saved in the checkpoint"
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    try:
        convert(options.input, options.output, options.source_format, options.target_format, argv[split + 1:],
                options.use_ema)
    except InputError as error:
        print(f"error: {command_line_message(error)}", file=sys.stderr)
        sys.exit(2)
    except NoSpaceError as error:
        print(f"error: {error.retry_message()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
