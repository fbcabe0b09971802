"""The one exception type that the command lines turn into a single clear line on stderr."""


class VitfoodError(Exception):
    """A problem with the user's input or environment, worded for the user (no traceback shown)."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message', short enough for a one-line error that wraps a library's."""
    text = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
