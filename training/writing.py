"""Files that only the main process writes, with every process learning whether the disk took them.

The main process writes the checkpoints, log.txt and the COCO results. Were it to stop alone on a full disk,
the others would fail in their next collective with a traceback each; instead all of them raise the same
NoSpaceError, which the main process reports in one line and the others pass over in silence.
"""
from collections.abc import Callable
from typing import Any, TypeVar

from deta.errors import NoSpaceError
from training.distributed import all_gather_object, is_main_process

T = TypeVar("T")


def write_on_main_process(write: Callable[..., T], *args: Any) -> T | None:
    """`write(*args)` on the main process (its result there, None elsewhere); a NoSpaceError it raises is raised
    on every process. Every process must call this."""
    result, failure = None, None
    if is_main_process():
        try:
            result = write(*args)
        except NoSpaceError as error:
            failure = error
    failed_path = all_gather_object(None if failure is None else failure.path)[0]
    if failure is not None:
        raise failure
    if failed_path is not None:
        raise NoSpaceError(failed_path)
    return result
