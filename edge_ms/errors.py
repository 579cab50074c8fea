"""The one exception type users see: a single line naming the file and the problem."""


class EdgeMSError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits non-zero."""


def fail(path: object, problem: str) -> EdgeMSError:
    """Build the error for ``path``: ``"<path>: <problem>"``."""
    return EdgeMSError(f"{path}: {problem}")
