"""Speed and memory of DETA: inference FPS at batch 1 and 4, training throughput, peak memory.

    python scripts/benchmark.py [--amp] [--device cpu|cuda] [--tiny] [--no_hf] [--latency_only | --scaling | --onnx]
                                [-- MAIN_PY_FLAGS...]

The model is the R50 5-scale DETA of scripts/r50_5scale_12ep.sh with random weights; main.py flags after
'--' change it (e.g. -- --eval_batching padded). Inference times the model's forward pass (post-processing
excluded, as in Deformable DETR's benchmark); training times full steps of main.py's training loop at the
recipe's 2 images per GPU. `--amp` runs under bf16 autocast, as main.py's --amp does. On CPU the latency
of one 800x1333 image is measured as well (one untimed call at that size first); `--latency_only` measures
only that. With transformers 4.57.x installed, HF's DetaForObjectDetection of the same configuration runs on
the same inputs and the table gives the speed ratio; with --amp, HF's model runs both under autocast and in
fp32, and ours is compared with each.

A latency is the median of a few calls (3 on CPU, 10 on CUDA) after one untimed call. Every latency of ours
comes with the machine's floor, measured in the same process: the model's FLOPs (torch's FlopCounterMode,
during the untimed call) over this machine's matmul rate in the precision that runs (fp32, or bf16 with
--amp). A shared machine's rate moves by tens of percent within minutes, so the rate is measured between
the calls and each call is set against the higher of the two rates around it; the report gives each call's
share of its floor and their median. On CPU one more call, with its matmuls and convolutions timed, gives
the time spent outside them. `--scaling` measures only our latency (one timed call each unless
--latency_calls says otherwise) and peak memory at 512x512, 800x1333 and the Swin recipe's 1200x2000, at
batch 1, 2 and 4.
`--onnx` measures only the latency of one image on the CPU in ONNX Runtime (the model exported by
deta.onnx_export with its post-processing, fp32) next to ours in fp32 and under bf16 autocast.

Peak memory: on CUDA the most allocated by tensors; on CPU the peak resident memory of the whole process
(reset before each measurement where Linux allows it). `--tiny` is a seconds-long run of a small model
on small images, for tests.
"""
import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deta
from deta.errors import InputError
from deta.formats.hf import HF_RESNETS
from deta.onnx_export import export_onnx
from engine import train_one_epoch
from main import get_args_parser
from ops.custom_op import compiled_devices
from training.cpu_memory import keep_freed_memory
from training.optim import build_optimizer

if TYPE_CHECKING:
    from transformers import DetaConfig

# scripts/launch.sh DETA_MODEL and the R50 recipe's assigners, with random weights.
R50_5SCALE = ["--with_box_refine", "--two_stage", "--num_feature_levels", "5", "--num_queries", "900",
              "--dim_feedforward", "2048", "--dropout", "0.0", "--cls_loss_coef", "1.0",
              "--assign_first_stage", "--assign_second_stage", "--pretrained_backbone", "none"]
# Small enough for seconds on a CPU. HF's two-stage model takes the best 1000 proposals of each image
# before NMS, so images must give at least 1000 tokens (at strides 8 to 128): 256x320 gives 1706.
TINY = [*R50_5SCALE, "--backbone", "resnet18", "--enc_layers", "1", "--dec_layers", "1", "--hidden_dim", "64",
        "--nheads", "2", "--dim_feedforward", "64", "--num_queries", "20"]
# Defaults by mode: CUDA at the COCO test size; CPU smaller and fewer iterations, to take minutes.
PRESETS = {
    "cuda": {"image_size": (800, 1333), "latency_size": None, "warmup": 10, "iters": 20, "latency_calls": 10},
    "cpu": {"image_size": (256, 384), "latency_size": (800, 1333), "warmup": 1, "iters": 1, "latency_calls": 3},
    "tiny": {"image_size": (256, 320), "latency_size": (256, 320), "warmup": 0, "iters": 1, "latency_calls": 2},
}
# --scaling: a square image, the COCO test size and the Swin recipe's --bigger one; batches up to 4.
SCALING_SIZES = ((512, 512), (800, 1333), (1200, 2000))
SCALING_BATCHES = (1, 2, 4)
HF_VERSION = "4.57."
TARGETS_PER_IMAGE = 10
TRAIN_BATCH = 2  # per GPU in the recipe


@dataclass(frozen=True)
class Setting:
    device: torch.device
    amp: bool
    image_size: tuple[int, int]  # of the throughput measurements
    latency_size: tuple[int, int] | None  # of the one-image latency, if measured
    warmup: int
    iters: int
    latency_calls: int  # timed calls per latency, after one untimed call


@dataclass(frozen=True)
class Case:
    """One measurement: inference when `targets` is None, else training steps."""
    name: str
    images: Tensor
    targets: list[dict[str, Tensor]] | None = None
    latency: bool = False  # seconds per call (see timed_calls) instead of images/s


@dataclass(frozen=True)
class Result:
    value: float
    unit: str
    peak_mib: float
    gflop: float | None = None  # of one call, where counted
    outside_matmul_s: float | None = None  # of one profiled call, where profiled
    calls: tuple[tuple[float, float], ...] = ()  # (seconds, matmul rate set against it) of each call, where paired

    def __str__(self) -> str:
        return f"{self.value:.3g} {self.unit}"


def make_batch(batch_size: int, size: tuple[int, int], num_classes: int, device: torch.device,
               seed: int = 0) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Normalised random images (B, 3, H, W) and random targets (cxcywh boxes, labels), the same per seed."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *size, generator=generator)
    targets = []
    for _ in range(batch_size):
        centres = 0.2 + 0.6 * torch.rand(TARGETS_PER_IMAGE, 2, generator=generator)
        sides = 0.05 + 0.25 * torch.rand(TARGETS_PER_IMAGE, 2, generator=generator)
        labels = torch.randint(1, num_classes, (TARGETS_PER_IMAGE,), generator=generator)
        targets.append({"boxes": torch.cat([centres, sides], 1).to(device), "labels": labels.to(device)})
    return images.to(device), targets


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux only (elsewhere the peak counts from the process start): hand memory that earlier cases freed
    # back to the system, then restart the peak resident size from the current one.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(step: Callable[[], object], setting: Setting) -> tuple[float, float]:
    """Seconds per call of `step` (mean of `iters` after `warmup` calls), and peak memory in MiB meanwhile.

    The peak counts from before the warm-up: on CPU its reset hands freed memory back to the system, which
    the timed calls must not have to fault in again."""
    _reset_peak_memory(setting.device)
    for _ in range(setting.warmup):
        step()
    _synchronize(setting.device)
    start = time.perf_counter()
    for _ in range(setting.iters):
        step()
    _synchronize(setting.device)
    return (time.perf_counter() - start) / setting.iters, _peak_memory_mib(setting.device)


def timed_calls(step: Callable[[], object], setting: Setting, with_rates: bool) -> list[tuple[float, float]]:
    """(seconds, matmul rate in GFLOP/s) of each of `setting.latency_calls` calls of `step`.

    With `with_rates` the rate is measured before the first call and after each, and a call gets the higher of
    the two around it: on a shared machine a call is only comparable with the machine as it was meanwhile,
    and the higher rate keeps a slow moment from inflating the share of the floor. Without, the rates are 0."""
    dtype = torch.bfloat16 if setting.amp else torch.float32
    measure_rate = (lambda: matmul_rate(dtype, setting.device)) if with_rates else (lambda: 0.0)
    rates, seconds = [measure_rate()], []
    for _ in range(setting.latency_calls):
        _synchronize(setting.device)
        start = time.perf_counter()
        step()
        _synchronize(setting.device)
        seconds.append(time.perf_counter() - start)
        rates.append(measure_rate())
    return [(call, max(rates[i], rates[i + 1])) for i, call in enumerate(seconds)]


def _autocast(setting: Setting) -> torch.autocast:
    return torch.autocast(setting.device.type, dtype=torch.bfloat16, enabled=setting.amp)


class Runner(Protocol):
    """How one implementation runs a forward pass and a training step on the shared inputs."""
    name: str

    def infer(self, images: Tensor) -> None: ...

    def train_step(self, images: Tensor, targets: list[dict[str, Tensor]]) -> None: ...


class OursRunner:
    name = "DETA (ours)"
    measures_floor = True  # its latencies come with FLOPs and the time outside matmuls

    def __init__(self, args: argparse.Namespace, setting: Setting) -> None:
        self.model, self.criterion, _ = deta.build_model(args)
        self.optimizer = build_optimizer(self.model, args)
        self.args, self.setting = args, setting
        # Inference as Detector, predict.py and main.py's CPU evaluation run it; the speed does not depend on
        # the weights, so training steps in between need no new copy.
        self.inference_model = deta.optimize_for_inference(self.model)

    @torch.no_grad()
    def infer(self, images: Tensor) -> None:
        with _autocast(self.setting):
            self.inference_model(list(images))

    def train_step(self, images: Tensor, targets: list[dict[str, Tensor]]) -> None:
        # One-batch epochs of main.py's own loop: loss, NaN guard, clipping and optimizer step included.
        train_one_epoch(self.model, self.criterion, [(list(images), targets)], self.optimizer, self.setting.device,
                        0, max_norm=self.args.clip_max_norm, amp=self.setting.amp)


def hf_config(args: argparse.Namespace, num_classes: int) -> "DetaConfig":
    """transformers' DetaConfig of the model that `args` describe (ResNet backbones only)."""
    from transformers import DetaConfig, ResNetConfig

    resnets = {name: key for key, name in HF_RESNETS.items()}
    if args.backbone not in resnets or args.dilation:
        raise InputError(f"--backbone {args.backbone}{' --dilation' if args.dilation else ''}: the HF comparison "
                         f"builds {', '.join(resnets)} without dilation; pass --no_hf")
    layer_type, depths, hidden_sizes = resnets[args.backbone]
    backbone = ResNetConfig(layer_type=layer_type, depths=list(depths), hidden_sizes=list(hidden_sizes),
                            out_features=["stage2", "stage3", "stage4"])
    return DetaConfig(
        backbone_config=backbone, use_pretrained_backbone=False, d_model=args.hidden_dim,
        encoder_layers=args.enc_layers, decoder_layers=args.dec_layers, encoder_attention_heads=args.nheads,
        decoder_attention_heads=args.nheads, encoder_ffn_dim=args.dim_feedforward,
        decoder_ffn_dim=args.dim_feedforward, dropout=args.dropout, num_queries=args.num_queries,
        two_stage_num_proposals=args.num_queries, num_feature_levels=args.num_feature_levels,
        encoder_n_points=args.enc_n_points, decoder_n_points=args.dec_n_points, two_stage=args.two_stage,
        with_box_refine=args.with_box_refine, assign_first_stage=args.assign_first_stage,
        assign_second_stage=args.assign_second_stage, auxiliary_loss=args.aux_loss, num_labels=num_classes,
        class_cost=args.set_cost_class, bbox_cost=args.set_cost_bbox, giou_cost=args.set_cost_giou,
        bbox_loss_coefficient=args.bbox_loss_coef, giou_loss_coefficient=args.giou_loss_coef,
        focal_alpha=args.focal_alpha)


class HFRunner:
    name = "HF DETA"

    def __init__(self, args: argparse.Namespace, setting: Setting) -> None:
        from transformers import DetaForObjectDetection

        self.model = DetaForObjectDetection(hf_config(args, deta.COCO_NUM_CLASSES)).to(setting.device)
        # The same optimizer settings as ours; HF names its backbone parameters differently.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.args, self.setting = args, setting

    def _forward(self, images: Tensor, labels: list[dict[str, Tensor]] | None = None) -> object:
        mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long, device=images.device)
        with _autocast(self.setting):
            return self.model(pixel_values=images, pixel_mask=mask, labels=labels)

    @torch.no_grad()
    def infer(self, images: Tensor) -> None:
        self.model.eval()
        self._forward(images)

    def train_step(self, images: Tensor, targets: list[dict[str, Tensor]]) -> None:
        self.model.train()
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        loss = self._forward(images, labels).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_max_norm)
        self.optimizer.step()


class HFFloat32Runner(HFRunner):
    """HF's DETA without autocast, next to bf16 runs: the baseline that a bf16 speed-up is quoted against."""
    name = "HF DETA fp32"

    def __init__(self, args: argparse.Namespace, setting: Setting) -> None:
        super().__init__(args, replace(setting, amp=False))


class OursBF16Runner(OursRunner):
    """Ours under bf16 autocast, next to fp32 runs of ours (--onnx)."""
    name = "DETA (ours) bf16"
    measures_floor = False

    def __init__(self, args: argparse.Namespace, setting: Setting) -> None:
        super().__init__(args, replace(setting, amp=True))


class OnnxRuntimeRunner:
    """The same model (same seed, same weights) exported by deta.onnx_export as a deployment would (with the NMS
    post-processing, a few milliseconds), run by ONNX Runtime on the CPU."""
    name = "ONNX Runtime"

    def __init__(self, args: argparse.Namespace, setting: Setting) -> None:
        import onnxruntime

        model, _, postprocessors = deta.build_model(args)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "deta.onnx"
            export_onnx(model, path, postprocess=postprocessors["bbox"])
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # the threads ours runs with
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(self, images: Tensor) -> None:
        sizes = torch.tensor([images.shape[-2:]] * len(images))
        self.session.run(None, {"images": images.cpu().numpy(), "orig_sizes": sizes.numpy()})

    def train_step(self, images: Tensor, targets: list[dict[str, Tensor]]) -> None:
        raise NotImplementedError("ONNX Runtime runs inference only")


def onnx_comparison(args: argparse.Namespace, setting: Setting) -> str:
    """--onnx: the latency of one image in ONNX Runtime (CPU, fp32) next to ours in fp32 and bf16, as a table."""
    import onnxruntime

    if setting.device.type != "cpu" or setting.amp:
        raise InputError("--onnx compares on the CPU, ours in fp32 and bf16 itself; drop --device cuda and --amp")
    print(f"device: {device_name(setting.device)}; torch {torch.__version__}; onnxruntime {onnxruntime.__version__}; "
          "ours fp32 and bf16 autocast, ONNX Runtime fp32 (exported first, untimed)", flush=True)
    return table(run_all([OursRunner, OursBF16Runner, OnnxRuntimeRunner], args, setting,
                         cases(setting, latency_only=True)))


def scaling_cases(setting: Setting, tiny: bool) -> list[Case]:
    """Latency at each of SCALING_SIZES (an eighth of each side with `tiny`) and SCALING_BATCHES."""
    found = []
    for height, width in SCALING_SIZES:
        size = (height // 8, width // 8) if tiny else (height, width)
        found += [Case(f"latency, batch {batch} of {size[0]}x{size[1]}",
                       make_batch(batch, size, deta.COCO_NUM_CLASSES, setting.device)[0], latency=True)
                  for batch in SCALING_BATCHES]
    return found


def cases(setting: Setting, latency_only: bool = False) -> list[Case]:
    """The measurements, on inputs that every runner shares; only the latency one with `latency_only`."""
    num_classes = deta.COCO_NUM_CLASSES
    latency_size = setting.latency_size or (setting.image_size if latency_only else None)
    latency = []
    if latency_size is not None:
        height, width = latency_size
        latency.append(Case(f"latency, one {height}x{width} image",
                            make_batch(1, latency_size, num_classes, setting.device)[0], latency=True))
    if latency_only:
        return latency
    found = [Case(f"inference, batch {batch}", make_batch(batch, setting.image_size, num_classes, setting.device)[0])
             for batch in (1, 4)]
    found += latency
    # Last: the gradients and optimizer state it leaves would count in the peaks of inference.
    found.append(Case(f"training, batch {TRAIN_BATCH}",
                      *make_batch(TRAIN_BATCH, setting.image_size, num_classes, setting.device)))
    return found


def run_case(runner: Runner, case: Case, setting: Setting) -> Result:
    if case.targets is None:
        step = lambda: runner.infer(case.images)
    else:
        step = lambda: runner.train_step(case.images, case.targets)
    if case.latency:
        with_floor = getattr(runner, "measures_floor", False)
        _reset_peak_memory(setting.device)
        flops = FlopCounterMode(display=False, custom_mapping=FUSED_FLOPS) if with_floor else contextlib.nullcontext()
        with flops:
            step()  # the untimed call
        calls = timed_calls(step, setting, with_rates=with_floor)
        seconds, peak = statistics.median(call for call, _ in calls), _peak_memory_mib(setting.device)
        if not with_floor:
            return Result(seconds, "s", peak)
        outside = seconds_outside_matmuls(step) if setting.device.type == "cpu" else None
        return Result(seconds, "s", peak, flops.get_total_flops() / 1e9, outside, tuple(calls))
    seconds, peak = measure(step, setting)
    return Result(len(case.images) / seconds, "img/s", peak)


def _fused_linear_flops(x_shape: list[int], *args, out_shape: list[int], **kwargs) -> int:
    return 2 * math.prod(out_shape) * x_shape[-1]


def _fused_conv_flops(x_shape: list[int], *args, out_shape: list[int], **kwargs) -> int:
    weight_shape = args[1] if len(args) == 12 else args[0]  # the .binary overload has `other` before the weight
    return conv_flop_count(x_shape, weight_shape, out_shape)


# FLOPs of oneDNN's fused inference ops (deta.optimize_for_inference), which FlopCounterMode does not know.
FUSED_FLOPS = {torch.ops.mkldnn._linear_pointwise: _fused_linear_flops,
               torch.ops.mkldnn._convolution_pointwise: _fused_conv_flops}
MATMUL_OPS = frozenset((torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
                        torch.ops.aten.convolution, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                        torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._convolution_pointwise))


class MatmulTimer(TorchDispatchMode):
    """Adds up the wall time of the matmuls and convolutions run under it (CPU: they run synchronously)."""
    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in MATMUL_OPS:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        return out


def seconds_outside_matmuls(step: Callable[[], object]) -> float:
    """Wall time of one call of `step` minus the time of its matmuls and convolutions."""
    with MatmulTimer() as timer:
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
    return elapsed - timer.seconds


def matmul_rate(dtype: torch.dtype, device: torch.device, min_call_s: float = 0.05, repeats: int = 3) -> float:
    """This machine's matmul rate in GFLOP/s: the best of `matmul_rates`' backends."""
    return max(matmul_rates(dtype, device, min_call_s, repeats).values())


def matmul_rates(dtype: torch.dtype, device: torch.device, min_call_s: float = 0.05,
                 repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of each matmul backend torch can use here, on square products in `dtype`: on the CPU, torch.mm
    (MKL in fp32) and oneDNN's linear (the one deta.optimize_for_inference calls), which differ by 2x on some
    CPUs (AMD Zen 5 in fp32); on CUDA, torch.mm (cuBLAS)."""
    backends = {"torch.mm": torch.mm}
    if device.type == "cpu" and _ONEDNN_LINEAR is not None:
        backends["oneDNN linear"] = lambda a, b: _ONEDNN_LINEAR(a, b, None, "none", [], "")
    return {name: _square_rate(product, dtype, device, min_call_s, repeats) for name, product in backends.items()}


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


def _square_rate(product: Callable[[Tensor, Tensor], Tensor], dtype: torch.dtype, device: torch.device,
                 min_call_s: float, repeats: int) -> float:
    """GFLOP/s of `product` on square matrices grown (from 256 to 2048 a side) until one call takes `min_call_s`,
    the best of `repeats` at that size. A CPU without bf16 instructions is slow in bf16 at every size, so small
    sizes keep the measurement short there."""
    size = 256
    while True:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        best = math.inf
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            product(a, b)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
        if best >= min_call_s or size >= 2048:
            return 2 * size**3 / best / 1e9
        size *= 2


def floor_report(results: dict[str, Result | str], precision: str) -> list[str]:
    """One line per latency of ours with its FLOPs: each call's floor and the share of it reached, and their median."""
    lines = []
    for case, result in results.items():
        if isinstance(result, Result) and result.gflop is not None:
            shares = [result.gflop / rate / seconds for seconds, rate in result.calls]
            each = ", ".join(f"{seconds:.2f} s at {rate:.1f} GFLOP/s = {share:.0%}"
                             for (seconds, rate), share in zip(result.calls, shares, strict=True))
            lines.append(f"{case}: {result.gflop:.0f} GFLOP; each call against the higher {precision} matmul rate "
                         f"measured just before and after it: {each}; median {statistics.median(shares):.0%} of "
                         "the floor" + (f", {result.outside_matmul_s:.2f} s outside matmuls and convolutions"
                                        if result.outside_matmul_s is not None else ""))
    return lines


def run_all(runner_types: list[type[Runner]], args: argparse.Namespace, setting: Setting,
            measured: list[Case]) -> dict[str, dict[str, Result | str]]:
    """{runner name: {case name: result, or the error it raised}}, with one model in memory at a time."""
    results: dict[str, dict[str, Result | str]] = {}
    for runner_type in runner_types:
        torch.manual_seed(0)
        runner = runner_type(args, setting)
        results[runner.name] = {}
        for case in measured:
            try:
                result: Result | str = run_case(runner, case, setting)
            except Exception as error:  # e.g. HF's code failing under autocast; the other cases still count
                result = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
            results[runner.name][case.name] = result
            memory = f", peak {result.peak_mib:.0f} MiB" if isinstance(result, Result) else ""
            print(f"  {runner.name}, {case.name}: {result}{memory}", file=sys.stderr, flush=True)
        del runner
        gc.collect()
    return results


def table(results: dict[str, dict[str, Result | str]]) -> str:
    """Markdown table: each runner's value and peak memory per case, and ours (the first) over each other's speed."""
    ours_name, *others = list(results)
    header = ["measurement", ours_name, *others, *(f"{name} peak MiB" for name in results),
              *(f"speed ours / {name}" for name in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in results[ours_name]:
        ours, *cells = [results[name][case] for name in results]
        line = [case, *map(str, [ours, *cells]),
                *(f"{c.peak_mib:.0f}" if isinstance(c, Result) else "" for c in [ours, *cells])]
        for other in cells:
            both = isinstance(ours, Result) and isinstance(other, Result)
            # Faster is more images/s, or fewer seconds.
            ratio = (ours.value / other.value if ours.unit == "img/s" else other.value / ours.value) if both else None
            line.append(f"{ratio:.2f}x" if ratio is not None else "")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else 'CPU'}, {torch.get_num_threads()} threads"


def hf_available() -> str | None:
    """None when transformers 4.57.x can be used, else why not."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "transformers is not installed"
    return None if version.startswith(HF_VERSION) else f"transformers {version} is installed, not {HF_VERSION}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="main.py flags after '--' change the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--tiny", action="store_true", help="small model and images: a smoke test in seconds")
    parser.add_argument("--no_hf", action="store_true", help="skip HF's DETA even where transformers is installed")
    parser.add_argument("--latency_only", action="store_true",
                        help="only the latency of one 800x1333 image (256x320 with --tiny): a quick comparison")
    parser.add_argument("--scaling", action="store_true",
                        help="only our latency and peak memory at 3 image sizes and batch 1, 2 and 4")
    parser.add_argument("--onnx", action="store_true",
                        help="only the latency of one 800x1333 image (CPU) in ONNX Runtime next to ours in fp32 and "
                             "bf16; exports the model first (minutes)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="images of the throughput measurements (default: 800 1333 on CUDA, 256 384 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 10 CUDA, 1 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 CUDA, 1 CPU)")
    parser.add_argument("--latency_calls", type=int, default=None,
                        help="timed calls per latency, after one untimed call (default: 10 CUDA, 3 CPU, 1 with "
                             "--scaling)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    try:
        run(options, argv[split + 1:])
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run(options: argparse.Namespace, overrides: list[str]) -> None:
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible; pass --device cpu")
    args = get_args_parser().parse_args([*(TINY if options.tiny else R50_5SCALE), *overrides,
                                         "--device", device.type])
    for flag, least in (("warmup", 0), ("iters", 1), ("latency_calls", 1)):
        if getattr(options, flag) is not None and getattr(options, flag) < least:
            raise InputError(f"--{flag} must be at least {least}, got {getattr(options, flag)}")
    chosen = {key: getattr(options, key) for key in ("warmup", "iters", "latency_calls")
              if getattr(options, key) is not None}
    if options.scaling:
        chosen.setdefault("latency_calls", 1)  # nine cases of up to a minute a call on CPU
    if options.image_size:
        chosen["image_size"] = tuple(options.image_size)
    setting = Setting(device=device, amp=options.amp, **{**PRESETS["tiny" if options.tiny else device.type], **chosen})
    if device.type == "cpu":
        keep_freed_memory()  # as main.py and predict.py run
    if options.onnx:
        print(onnx_comparison(args, setting))
        return
    runners: list[type[Runner]] = [OursRunner]
    why_not_hf = "--no_hf" if options.no_hf else "--scaling" if options.scaling else hf_available()
    if why_not_hf is None:
        hf_config(args, deta.COCO_NUM_CLASSES)  # unsupported flags fail here, before anything is timed
        runners += [HFRunner, HFFloat32Runner] if options.amp else [HFRunner]
    attention = "compiled deta_ops" if device.type in compiled_devices() else "PyTorch reference"
    print(f"device: {device_name(device)}; torch {torch.__version__}; {'bf16 autocast' if options.amp else 'fp32'}; "
          f"images {setting.image_size[0]}x{setting.image_size[1]}; warmup {setting.warmup}, {setting.iters} timed "
          f"iterations; our deformable attention: {attention}"
          + ("" if why_not_hf else f"; transformers {importlib.metadata.version('transformers')}")
          + (f"; HF DETA not measured: {why_not_hf}" if why_not_hf else ""), flush=True)
    precision = "bf16" if options.amp else "fp32"
    dtype = torch.bfloat16 if options.amp else torch.float32
    rates = matmul_rates(dtype, device)
    each = ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
    print(f"matmul rate: {max(rates.values()):.1f} GFLOP/s in {precision}, the best backend ({each}); "
          f"{bf16_instructions(device)}", flush=True)
    measured = scaling_cases(setting, options.tiny) if options.scaling else cases(setting, options.latency_only)
    results = run_all(runners, args, setting, measured)
    print(table(results))
    print("\n".join(floor_report(results[OursRunner.name], precision)))


def bf16_instructions(device: torch.device) -> str:
    """What this device offers bf16 matmuls (a CPU without AVX512-BF16 or AMX runs them far slower than fp32)."""
    if device.type == "cuda":
        return f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}"
    found = [name for name, present in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                        ("AMX", torch.cpu._is_amx_tile_supported())) if present]
    return f"bf16 instructions: {', '.join(found) or 'none (neither AVX512-BF16 nor AMX)'}"


if __name__ == "__main__":
    main()
