"""The error types for bad user input."""
from collections.abc import Callable


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
