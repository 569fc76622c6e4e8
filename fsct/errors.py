"""The one exception type a user sees: `fsct` prints its message on one line and exits non-zero."""


class FsctError(Exception):
    """Bad input or a refused action. The message names the file and the problem, on one line."""
