"""The one exception type users see. The CLI turns it into a one-line message and exit code 2."""


class OneShotBenchError(Exception):
    """A user-facing error: bad input, missing data, mismatched artefacts.

    The message must fit on one line and say what is wrong and how to fix it.
    """
