"""scripts/compare_revisions.py: two revisions measured in turn in one run, and the ratio of their latencies."""
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/compare_revisions.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def worktrees() -> str:
    return subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_runs_alternate_and_the_ratio_is_of_the_median_latencies() -> None:
    before = worktrees()
    done = compare("HEAD", "WORKTREE", "--rounds", "2", "--", "--tiny")
    assert done.returncode == 0, done.stderr
    rows = [row.strip("|").split("|") for row in done.stdout.splitlines() if re.match(r"^\| \d", row)]
    assert [(int(row[0]), row[1].split()[0]) for row in rows] == [(1, "before"), (1, "after"), (2, "after"),
                                                                 (2, "before")]
    latency = {role: [float(row[2].removesuffix(" s ")) for row in rows if row[1].split()[0] == role]
               for role in ("before", "after")}
    assert all(0 < seconds < 10 for seconds in latency["before"] + latency["after"])
    assert all(re.fullmatch(r" \d+ % ", row[3]) and float(row[4]) > 0 for row in rows)  # floors measured
    ratio = float(re.search(r"after / before = ([\d.]+)", done.stdout).group(1))
    medians = {role: statistics.median(values) for role, values in latency.items()}
    assert abs(ratio - medians["after"] / medians["before"]) < 0.02 + 0.01 * ratio  # of values printed to 3 digits
    assert "device: " in done.stdout
    assert worktrees() == before  # the checkout of HEAD is gone


def test_a_wrong_revision_or_a_failing_benchmark_is_one_line() -> None:
    done = compare("no-such-branch", "HEAD")
    assert done.returncode == 2 and done.stderr == (
        f"error: no-such-branch: no such commit, branch or tag in {REPO} (see git log --oneline); or give WORKTREE "
        "for the checkout as it stands\n")
    before = worktrees()
    done = compare("HEAD", "WORKTREE", "--rounds", "1", "--", "--no_such_flag")
    assert done.returncode == 2 and done.stderr.startswith("error: before ")
    assert "scripts/benchmark.py failed (" in done.stderr and "--no_such_flag" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert worktrees() == before
