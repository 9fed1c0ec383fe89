"""The error base class that the CLI turns into a one-line message instead of a traceback."""


class BpsimError(Exception):
    """Invalid input or state; the message names the value, file or row and the fix."""
