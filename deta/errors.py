"""The error types that entry points print as one line: bad user input, and a full disk."""
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# A write that fails for lack of room: the disk is full, or the user's quota is.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class InputError(ValueError):
    """Bad input from the user (a file, a flag, a data set).

    The message is one line that names the offending thing and says what to do; entry points
    print it instead of a traceback. `local`: met by this process alone (a data error in its share of
    the images), where every process of a distributed run meets any other error alike.
    """

    def __init__(self, message: str, local: bool = False) -> None:
        super().__init__(message)
        self.local = local


class ArgumentError(InputError):
    """A model argument whose value cannot work, raised by the model code.

    `template` names each argument of `values` as `{name}`. The message reads `name=value` (the keyword of
    `Detector.from_checkpoint`); `on_command_line()` reads `--name value`, as main.py and the scripts say it.
    """

    def __init__(self, template: str, **values: object) -> None:
        self.template = template
        self.values = values
        super().__init__(self._render(lambda name, value: f"{name}={value!r}"))

    def on_command_line(self) -> str:
        return self._render(lambda name, value: f"--{name}" if value is True else f"--{name} {value}")

    def _render(self, spell: Callable[[str, object], str]) -> str:
        text = self.template
        for name, value in self.values.items():  # not str.format: the rest of the text may hold braces
            text = text.replace(f"{{{name}}}", spell(name, value))
        return text


def command_line_message(error: InputError) -> str:
    """What an entry point that takes flags prints after `error: `."""
    return error.on_command_line() if isinstance(error, ArgumentError) else str(error)


class NoSpaceError(Exception):
    """A file could not be written because its disk (or the user's quota there) is full.

    The message is one line: which file, where, and how much space is left there; entry points add what
    was kept and how to go on.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        super().__init__(f"no space left to write {self.path.name} in {self.path.parent} "
                         f"({_free_space(self.path.parent)})")

    def retry_message(self) -> str:
        """The message for a command that can simply run again: it says that the file is as it was."""
        return f"{self}; an earlier {self.path.name} there is unchanged; free some space there and run it again"

    @staticmethod
    def caused(error: BaseException) -> bool:
        """Whether `error` or an exception it was raised from or during is a write failing for lack of space
        (torch.save reports ENOSPC as a RuntimeError raised while handling the OSError)."""
        seen = set()
        while error is not None and id(error) not in seen:
            if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
                return True
            seen.add(id(error))
            error = error.__cause__ or error.__context__
        return False


def _free_space(folder: Path) -> str:
    """'12.3 MiB free there', from shutil.disk_usage (what the user may write, root's reserve excluded)."""
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "free space unknown"
    if free < 1024:
        return f"{free:.0f} bytes free there"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        free /= 1024
        if free < 1024 or unit == "TiB":
            return f"{free:.1f} {unit} free there"
    raise AssertionError("unreachable")
