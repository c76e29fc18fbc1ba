"""The error type for bad user input."""


class InputError(ValueError):
    """Bad input from the user (a file, a flag, a data set).

    The message is one line that names the offending thing and says what to do; entry points
    print it instead of a traceback. `local`: met by this process alone (a data error in its share of
    the images), where every process of a distributed run meets any other error alike.
    """

    def __init__(self, message: str, local: bool = False) -> None:
        super().__init__(message)
        self.local = local
