"""scripts/benchmark.py in its tiny CPU mode, and the HF configuration it compares against."""
import importlib.metadata
import re
import shutil
import time

import pytest
import torch

from main import get_args_parser
from scripts import benchmark

HF = benchmark.hf_available() is None


def test_tiny_cpu_run_prints_a_table_of_every_measurement(capsys: pytest.CaptureFixture) -> None:
    benchmark.main(["--tiny", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("device: ") and "\nmatmul rate: " in out
    header, rule, *rows = [line for line in out.splitlines() if line.startswith("|")]
    assert header.startswith("| measurement | DETA (ours) |") and rule.startswith("|---|")
    assert [row.split(" | ")[0] for row in rows] == ["| inference, batch 1", "| inference, batch 4",
                                                      "| latency, one 256x320 image", "| training, batch 2"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("| ").split(" | ")]
        runners = 2 if HF else 1
        values, memory = cells[1:1 + runners], cells[1 + runners:1 + 2 * runners]
        assert all(float(value.split()[0]) > 0 for value in values), row  # no runner failed
        assert all(float(mib) > 0 for mib in memory), row
        if HF:
            assert cells[-1].endswith("x") and float(cells[-1][:-1]) > 0
    (floor,) = [line for line in out.splitlines() if line.startswith("latency, one 256x320 image: ")]
    gflop, calls, median, outside = re.fullmatch(
        r"latency, one 256x320 image: (\d+) GFLOP; each call against the higher fp32 matmul rate measured just "
        r"before and after it: (.*); median (\d+)% of the floor, ([\d.]+) s outside matmuls and convolutions",
        floor).groups()
    gflop, median, outside = float(gflop), float(median), float(outside)
    calls = [tuple(map(float, call)) for call in re.findall(r"([\d.]+) s at ([\d.]+) GFLOP/s = (\d+)%", calls)]
    assert len(calls) == benchmark.PRESETS["tiny"]["latency_calls"] and gflop > 1
    assert 0 < outside < max(latency for latency, _, _ in calls)
    for latency, rate, share in calls:
        assert rate > 0
        # The share from the printed figures, within their rounding (GFLOP to units, seconds to 0.01, % to units).
        lowest = 100 * (gflop - 0.5) / rate / (latency + 0.005) - 1
        highest = 100 * (gflop + 0.5) / (rate - 0.05) / max(latency - 0.005, 1e-9) + 1
        assert lowest <= share <= highest
    shares = sorted(share for _, _, share in calls)
    assert shares[0] - 1 <= median <= shares[-1] + 1


def test_each_timed_call_is_set_against_the_higher_rate_around_it(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = iter([100.0, 150.0, 90.0, 120.0])
    monkeypatch.setattr(benchmark, "matmul_rate", lambda dtype, device: next(rates))
    durations = iter([0.02, 0.0, 0.01])
    setting = benchmark.Setting(torch.device("cpu"), amp=False, image_size=(8, 8), latency_size=None, warmup=0,
                                iters=1, latency_calls=3)
    calls = benchmark.timed_calls(lambda: time.sleep(next(durations)), setting, with_rates=True)
    assert [rate for _, rate in calls] == [150.0, 150.0, 120.0]
    seconds = [call for call, _ in calls]
    assert seconds[0] >= 0.02 and seconds[2] >= 0.01 and seconds[1] < seconds[2]
    assert [rate for _, rate in benchmark.timed_calls(lambda: None, setting, with_rates=False)] == [0.0] * 3


def test_scaling_measures_three_sizes_at_three_batch_sizes(capsys: pytest.CaptureFixture) -> None:
    benchmark.main(["--tiny", "--device", "cpu", "--scaling"])
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| latency")]
    assert rows == [f"| latency, batch {batch} of {size}" for size in ("64x64", "100x166", "150x250")
                    for batch in (1, 2, 4)]


def test_matmul_timer_counts_matmuls_alone() -> None:
    a = torch.randn(256, 256)
    with benchmark.MatmulTimer() as timer:
        start = time.perf_counter()
        for _ in range(20):
            a.exp().sin()  # not a matmul
        outside = time.perf_counter() - start
    assert timer.seconds == 0 and outside > 0
    with benchmark.MatmulTimer() as timer:
        start = time.perf_counter()
        torch.mm(a, a)
        torch.nn.functional.linear(a, a, a[0])
        total = time.perf_counter() - start
    assert 0 < timer.seconds <= total


@pytest.mark.skipif(not HF, reason="needs transformers 4.57.x")
def test_hf_config_describes_the_same_model() -> None:
    # transformers' DetaConfig read back by our HF checkpoint reader gives the arguments it was made from.
    from deta.formats import hf

    args = get_args_parser().parse_args(benchmark.R50_5SCALE)
    read_back = hf.model_args(benchmark.hf_config(args, 91).to_dict())
    assert read_back == {key: getattr(args, key) for key in read_back} | {"num_classes": 91}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device_is_an_input_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--tiny", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: no CUDA device")


@pytest.mark.parametrize("flag", ["--latency_calls", "--iters"])
def test_no_timed_calls_is_an_input_error(flag: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--tiny", "--device", "cpu", flag, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {flag} must be at least 1, got 0\n"


def test_missing_transformers_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.40.0")
    assert benchmark.hf_available() == "transformers 4.40.0 is installed, not 4.57.x"


def test_onnx_runtime_latency_next_to_ours_in_fp32_and_bf16(tiny_onnx, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    # The tests' exported small DETA stands in for the export of the benchmark's own (a minute each).
    monkeypatch.setattr(benchmark, "export_onnx", lambda model, path, **options: shutil.copy(tiny_onnx, path))
    benchmark.main(["--tiny", "--device", "cpu", "--onnx"])
    out = capsys.readouterr().out
    assert out.startswith("device: ") and "onnxruntime 1." in out
    header, _, row = [line for line in out.splitlines() if line.startswith("|")]
    assert header.startswith("| measurement | DETA (ours) | DETA (ours) bf16 | ONNX Runtime |")
    cells = [cell.strip() for cell in row.strip("| ").split(" | ")]
    assert cells[0] == "latency, one 256x320 image"
    assert all(cell.endswith(" s") and float(cell.split()[0]) > 0 for cell in cells[1:4]), row
    assert cells[-1].endswith("x") and float(cells[-1][:-1]) > 0  # ours over ONNX Runtime


def test_the_floor_is_the_best_backend_and_each_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    if benchmark._ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN linear")
    products = []
    reported = iter([200.0, 455.0])

    def fake_rate(product, dtype, device, min_call_s, repeats):
        a, b = torch.randn(4, 4), torch.randn(4, 4)
        products.append((product(a, b), a, b))
        return next(reported)

    monkeypatch.setattr(benchmark, "_square_rate", fake_rate)
    assert benchmark.matmul_rates(torch.float32, torch.device("cpu")) == {"torch.mm": 200.0, "oneDNN linear": 455.0}
    (mm, a, b), (onednn, c, d) = products
    torch.testing.assert_close(mm, a @ b)
    torch.testing.assert_close(onednn, c @ d.T)  # a linear layer's product: the same FLOPs
    monkeypatch.setattr(benchmark, "matmul_rates", lambda *args: {"torch.mm": 200.0, "oneDNN linear": 455.0})
    assert benchmark.matmul_rate(torch.float32, torch.device("cpu")) == 455.0
