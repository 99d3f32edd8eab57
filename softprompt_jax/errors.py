"""One error type for user mistakes, so the command line can tell them from bugs."""


class SoftpromptError(ValueError):
    """A user mistake (a bad file, setting or input), with a one-line message naming it.

    The CLI prints the first line and exits with status 2; any other exception is a bug
    and keeps its full traceback (exit status 1).
    """
