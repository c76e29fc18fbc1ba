"""README.md and docs/*.md: every fenced shell command runs as written, and the README stays a front door.

A command must name a script of this repository (run by python, torchrun, bash, sbatch or directly) or a
program of another project (pip, huggingface-cli, ...); every flag it passes must be in the `--help` of the
program that receives it: the script's own, or main.py's for the flags that a script hands on to main.py
(the recipes' extra arguments, and Python scripts' arguments after `--`). Each script's `--help` runs once per
session, all of them in one process.
"""
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 8000  # what `wc -c` counts

PYTHONS = {"python", "python3", ".venv/bin/python"}
LAUNCHERS = {"torchrun", "sbatch", "srun", "bash", "sh", "timeout", "env"}  # run the script named after their options
# Programs of other projects that the pages call; their flags are not checked here.
OTHER_PROGRAMS = {"pip", "pip3", "huggingface-cli", "hf", "git", "cd", "export", "mkdir", "ls", "cat", "head", "tail",
                  "grep", "wc", "echo", "cp", "mv", "rm", "tar", "unzip", "wget", "curl", "sha256sum", "du", "df",
                  "tensorboard", "nvidia-smi", "nvcc", "compute-sanitizer", "lint-imports", "ruff", "pytest", "scancel"}
HANDS_ON = "after '--'"  # in a Python script's --help: it hands the flags after '--' on to main.py, or to
HANDED_TO = re.compile(r"flags after '--' go to (\S+\.py)")  # the script that this names
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<"}
# Runs `SCRIPT --help` for each argument as the shell would run the script, and prints the texts as JSON.
_PRINT_HELPS = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, ".")
texts = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        if script.startswith("-m "):
            runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    texts[script] = out.getvalue()
print(json.dumps(texts))
"""
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_blocks(text: str) -> Iterator[str]:
    """The bodies of the page's ```bash / ```sh / ```shell blocks, in order."""
    yield from re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def commands(text: str) -> Iterator[list[str]]:
    """Each simple command of the page's shell blocks as words: continuation lines joined, comments dropped,
    variables that the page assigned (`DETA="$BASE ..."`) expanded, environment prefixes and redirections
    removed, pipelines and lists split. Brackets of optional parts (`[--amp]`) are dropped."""
    variables: dict[str, str] = {}
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = _VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = [word.strip("[]") for word in lexer]
            for command in _split(words):
                while command and _ASSIGNMENT.match(command[0]):
                    name, value = command.pop(0).split("=", 1)
                    variables[name] = value
                if command:
                    yield command


def _split(words: list[str]) -> Iterator[list[str]]:
    command: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in SEPARATORS:
            yield command
            command = []
        elif word in REDIRECTS:
            skip_next = True
        elif word:
            command.append(word)
    yield command


def target(command: list[str]) -> tuple[str | None, list[str]]:
    """(the script the command runs, relative to the repository, or a module as `-m NAME`; its arguments), or
    (None, []) for a program of another project. Raises ValueError for a command that names neither."""
    program = command[0]
    if program in OTHER_PROGRAMS:
        return None, []
    if program in PYTHONS and command[1:2] == ["-c"]:
        return None, []
    if program in PYTHONS and command[1:2] == ["-m"]:
        module = command[2]
        if module in ("pip", "pytest", "torch.distributed.run"):
            return (None, []) if module != "torch.distributed.run" else target(["torchrun", *command[3:]])
        return f"-m {module}", command[3:]
    if program in PYTHONS or program in LAUNCHERS or program.endswith((".py", ".sh")):
        for i, word in enumerate(command):
            if word.endswith((".py", ".sh")):
                return word.removeprefix("./"), command[i + 1:]
    raise ValueError(f"runs no script of this repository: {shlex.join(command)}")


def script_file(script: str) -> Path:
    if script.startswith("-m "):
        return REPO / (script[3:].replace(".", "/") + ".py")
    return REPO / script


def flags(words: list[str]) -> list[str]:
    """The options among `words` (`--name=value` counts as `--name`)."""
    return [word.split("=", 1)[0] for word in words if re.match(r"^--?[A-Za-z]", word)]


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def shell_hands_on(script: Path) -> str:
    """Where a shell script passes its arguments: 'main.py' (the recipes and the demo), 'command' (a command
    line to run, as slurm_train.sh's), 'unchecked' (pytest's, test.sh), or 'none'."""
    text = script.read_text().replace("\\\n", " ")
    if "launch.sh" in text:
        return "main.py"
    for line in text.splitlines():
        if '"$@"' in line:
            if "main.py" in line:
                return "main.py"
            if "pytest" in line:
                return "unchecked"
            if re.search(r'exec "\$@"', line):
                return "command"
    return "none"


def problems(command: list[str], helps: dict[str, str]) -> list[str]:
    """What is wrong with one command, given the --help texts of the scripts (see needed_helps)."""
    try:
        script, arguments = target(command)
    except ValueError as err:
        return [str(err)]
    if script is None:
        return []
    path = script_file(script)
    if not path.is_file():
        return [f"{script}: no such script ({shlex.join(command)})"]
    if script.endswith(".sh"):
        where = shell_hands_on(path)
        if where == "command":
            return problems(arguments, helps) if arguments else []
        if where == "unchecked":
            return []
        # A shell script that hands nothing on takes no flags.
        own, own_flags, passed_on = ([], set(), arguments) if where == "main.py" else (arguments, set(), [])
        receiver = "main.py"
    else:
        own, own_flags, passed_on = arguments, help_flags(helps[script]), []
        receiver = hands_on_to(helps[script])
        if receiver and "--" in arguments:
            cut = arguments.index("--")
            own, passed_on = arguments[:cut], arguments[cut + 1:]
    unknown = [f"{script}: no flag {flag} in its --help" for flag in flags(own) if flag not in own_flags]
    unknown += [f"{script}: no flag {flag} in {receiver} --help, which receives it" for flag in flags(passed_on)
                if flag not in help_flags(helps[receiver])]
    return [f"{problem} ({shlex.join(command)})" for problem in unknown]


def hands_on_to(help_text: str) -> str | None:
    """The script that receives a Python script's flags after '--', as its --help says, if it hands them on."""
    named = HANDED_TO.search(help_text)
    return named.group(1) if named else "main.py" if HANDS_ON in help_text else None


def needed_helps(all_commands: list[list[str]]) -> set[str]:
    """The Python scripts whose --help the commands need: main.py always (recipes and '--' hand flags to it)."""
    needed = {"main.py"}
    for command in all_commands:
        while command:
            try:
                script, arguments = target(command)
            except ValueError:
                break
            if script is None or not script_file(script).is_file():
                break
            if not script.endswith(".sh"):
                needed.add(script)
                needed.update(HANDED_TO.findall(script_file(script).read_text()))  # as its --help will say
                break
            command = arguments if shell_hands_on(script_file(script)) == "command" else []
    return needed


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """`--help` of every Python script that the pages run, each run once, all in one process (torch imports
    once)."""
    all_commands = [command for page in PAGES for command in commands(page.read_text())]
    run = subprocess.run([sys.executable, "-c", _PRINT_HELPS, *sorted(needed_helps(all_commands))], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"--help failed:\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_commands_name_scripts_and_flags_that_exist(page: Path, helps: dict[str, str]) -> None:
    found = [problem for command in commands(page.read_text()) for problem in problems(command, helps)]
    assert not found, f"{page.relative_to(REPO)}:\n" + "\n".join(found)


def test_the_check_catches_a_wrong_flag_and_a_missing_script(helps: dict[str, str]) -> None:
    page = """
```bash
COCO="--coco_path /data/coco"
torchrun --nproc_per_node=2 main.py $COCO --eval \\
    --resum ckpt.pth   # a typo
GPUS=1 bash scripts/r50_5scale_12ep.sh --epochs 1 --no_such_flag
python scripts/predict.py --resume ckpt.pth img.jpg --out preds/ -- --eval_siz 600
python scripts/no_such_script.py --help
```
"""
    found = [problem for command in commands(page) for problem in problems(command, helps)]
    assert [problem.split(" (")[0] for problem in found] == [
        "main.py: no flag --resum in its --help",
        "scripts/r50_5scale_12ep.sh: no flag --no_such_flag in main.py --help, which receives it",
        "scripts/predict.py: no flag --eval_siz in main.py --help, which receives it",
        "scripts/no_such_script.py: no such script",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_examples_parse(page: Path) -> None:
    for block in re.findall(r"^```python[ \t]*\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL):
        compile(block, f"{page.name}, python block", "exec")


def test_readme_is_short_and_links_every_docs_page() -> None:
    text = README.read_text()
    assert len(text.encode()) <= README_MAX_BYTES, f"README.md: {len(text.encode())} bytes, at most {README_MAX_BYTES}"
    unlinked = [page.name for page in PAGES[1:] if f"](docs/{page.name}" not in text]
    assert not unlinked, f"README.md links no docs/{unlinked}"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated one numbered."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    anchors: set[str] = set()
    for title in re.findall(r"^#{1,6} +(.+?) *#* *$", prose, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(page: Path, text: str) -> list[str]:
    """Links of `text` (on `page`) to files of this repository that do not exist, or to headings that the
    linked page does not have."""
    broken = []
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    for link in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{link}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{link}: no such heading in {linked.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    broken = broken_links(page, page.read_text())
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_link_check_catches_a_missing_file_and_heading() -> None:
    page = REPO / "docs" / "TRAINING.md"
    text = "[a](BENCHMARKS.md#no-such-heading) [b](NO_SUCH.md) [c](#resuming) [d](../README.md#status) [e](https://x.org)"
    assert broken_links(page, text) == ["BENCHMARKS.md#no-such-heading: no such heading in BENCHMARKS.md",
                                        "NO_SUCH.md: no such file"]
