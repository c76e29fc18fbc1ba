"""One-image latency of two revisions of this repository, measured in turn in one run on this machine.

    python scripts/compare_revisions.py 8de3864 HEAD                     # 800x1333, fp32, 3 rounds
    python scripts/compare_revisions.py main WORKTREE --rounds 5 -- --amp --latency_calls 5

Each revision is checked out into a temporary git worktree (WORKTREE is this checkout as it stands,
uncommitted changes included) and runs its own `scripts/benchmark.py --latency_only --no_hf` there, with this
interpreter and a kernel build folder of its own, with the flags given after '--'. The runs go A B, B A,
A B, ... so that a drift of a shared machine's speed weighs on both alike. Each run prints its median latency,
its share of the machine's matmul floor (as that revision's benchmark.py measures it) and the matmul rate;
the last line gives each revision's median over its runs and their ratio.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
BENCHMARK = ["scripts/benchmark.py", "--latency_only", "--no_hf"]


@dataclass(frozen=True)
class Revision:
    role: str  # "before" or "after"
    commit: str | None  # None: this checkout as it stands
    label: str  # the short commit, and whether uncommitted changes come with it


@dataclass(frozen=True)
class Run:
    latency_s: float
    share_of_floor: str  # "77 %", or "-" from a revision whose benchmark measured no floor
    matmul_rate: str
    device: str  # benchmark.py's first line: CPU, threads, torch, precision


class CompareError(Exception):
    """A revision that cannot be checked out or measured; the message is one line."""


def main() -> None:
    args, benchmark_flags = parse_args(sys.argv[1:])
    try:
        compare(args.before, args.after, args.rounds, benchmark_flags)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s BEFORE AFTER "
                                     "[--rounds N] [-- BENCHMARK_FLAGS...]",
                                     epilog="flags after '--' go to scripts/benchmark.py (e.g. --amp, "
                                     "--latency_calls N, --tiny)")
    parser.add_argument("before", help=f"a commit, branch or tag, or {WORKTREE} for this checkout as it stands")
    parser.add_argument("after", help="the same; the ratio is after / before")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each revision (default: 3)")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1")
    return args, argv[split + 1:]


def compare(before: str, after: str, rounds: int, benchmark_flags: list[str]) -> None:
    revisions = [_revision("before", before), _revision("after", after)]
    command = " ".join([*BENCHMARK, *benchmark_flags])
    print(f"before: {revisions[0].label}, after: {revisions[1].label}; each runs `{command}`", flush=True)
    print("| round | revision | latency | share of the floor | matmul rate GFLOP/s |\n|---|---|---|---|---|",
          flush=True)
    runs: dict[Revision, list[Run]] = {revision: [] for revision in revisions}
    with tempfile.TemporaryDirectory(prefix="compare_revisions.") as scratch, \
            _checkouts(revisions, Path(scratch)) as folders:
        for round_index in range(rounds):
            for revision in revisions if round_index % 2 == 0 else revisions[::-1]:
                run = _measure(revision, folders[revision], Path(scratch), benchmark_flags)
                runs[revision].append(run)
                print(f"| {round_index + 1} | {revision.role} {revision.label} | {run.latency_s:.3g} s | "
                      f"{run.share_of_floor} | {run.matmul_rate} |", flush=True)
    medians = [statistics.median(run.latency_s for run in runs[revision]) for revision in revisions]
    print(runs[revisions[0]][0].device)
    print(f"median latency over {rounds} run(s) each: before {medians[0]:.3g} s, after {medians[1]:.3g} s; "
          f"after / before = {medians[1] / medians[0]:.2f} (below 1: after is faster)")


def _revision(role: str, name: str) -> Revision:
    if name == WORKTREE:
        changed = _git("status", "--porcelain", "--untracked-files=no").strip()
        head = _git("rev-parse", "--short", "HEAD").strip()
        return Revision(role, None, f"{head}{' + uncommitted changes' if changed else ''}")
    try:
        commit = _git("rev-parse", "--verify", "--end-of-options", f"{name}^{{commit}}").strip()
    except CompareError:
        raise CompareError(f"{name}: no such commit, branch or tag in {REPO} (see git log --oneline); or give "
                           f"{WORKTREE} for the checkout as it stands") from None
    return Revision(role, commit, _git("rev-parse", "--short", commit).strip())


@contextmanager
def _checkouts(revisions: list[Revision], scratch: Path) -> Iterator[dict[Revision, Path]]:
    """Each revision's folder: a detached git worktree under `scratch`, removed at the end, or this checkout."""
    folders, added = {}, []
    try:
        for revision in revisions:
            if revision.commit is None:
                folders[revision] = REPO
                continue
            folder = scratch / revision.role
            _git("worktree", "add", "--detach", "--quiet", str(folder), revision.commit)
            added.append(folder)
            folders[revision] = folder
        yield folders
    finally:
        for folder in added:
            _git("worktree", "remove", "--force", str(folder))


def _measure(revision: Revision, folder: Path, scratch: Path, benchmark_flags: list[str]) -> Run:
    # A kernel build folder per checked-out revision: sharing one, each run would rebuild the kernels from the
    # other's sources. This checkout keeps its usual one.
    env = dict(os.environ)
    if revision.commit is not None:
        env["DETA_OPS_BUILD_DIR"] = str(scratch / f"{revision.role}-ops")
    done = subprocess.run([sys.executable, *BENCHMARK, *benchmark_flags], cwd=folder, env=env, capture_output=True,
                          text=True, check=False)
    output = done.stdout + done.stderr  # benchmark.py reports each measurement on stderr as it ends
    latency = re.search(r"DETA \(ours\), latency, one \S+ image: ([\d.]+) s", output)
    if done.returncode != 0 or latency is None:
        last_line = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise CompareError(f"{revision.role} {revision.label}: scripts/benchmark.py failed ({last_line})")
    share = re.search(r"median (\d+)% of the floor", output)
    rate = re.search(r"^matmul rate: ([\d.]+) GFLOP/s", output, re.MULTILINE)
    device = re.search(r"^device: .*$", output, re.MULTILINE)
    return Run(float(latency.group(1)), f"{share.group(1)} %" if share else "-", rate.group(1) if rate else "-",
               device.group(0) if device else "device: not printed by this revision's benchmark.py")


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CompareError(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout


if __name__ == "__main__":
    main()
