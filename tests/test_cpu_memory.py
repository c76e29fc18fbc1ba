"""training.cpu_memory: large activations reused without page faults once glibc keeps freed memory."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A residual block's element-wise passes over (65536, 256) activations (64 MiB each, above glibc's mmap
# threshold), called 10 times: the page faults of the last 4 calls, when the heap has settled.
FAULTS_OF_LAST_CALLS = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from training.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if {keep} else None
x = torch.randn(2**16, 256)
for call in range(10):
    if call == 6:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.relu(x * 2) + x
    del y
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_CALL = 3 * 64 * 2**20 // 4096  # the product, its ReLU and the sum


def _faults(keep: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_LAST_CALLS.format(repo=str(REPO), keep=keep)],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_activations_are_reused_without_page_faults():
    applied, kept = _faults(keep=True)
    assert applied == "True" and kept < 0.25 * 4 * PAGES_PER_CALL, kept
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):  # with 2 MiB pages fresh mappings fault less
        _, unkept = _faults(keep=False)
        assert unkept > 0.5 * 4 * PAGES_PER_CALL, unkept
