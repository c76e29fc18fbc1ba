"""The error type for bad user input."""


class InputError(ValueError):
    """Bad input from the user (a file, a flag, a data set).

    The message is one line that names the offending thing and says what to do; entry points
    print it instead of a traceback.
    """
