"""The one exception type that the CLIs turn into a one-line message and exit code 1."""


class KitsError(Exception):
    """A problem with the user's input: the message says what was expected, what was found,
    and the fix. Anything else that escapes is a bug and keeps its traceback."""
