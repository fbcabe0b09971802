"""The one exception type that the command lines turn into a single clear line on stderr."""


class VitfoodError(Exception):
    """A problem with the user's input or environment, worded for the user (no traceback shown)."""
