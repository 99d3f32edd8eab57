"""One error type for user mistakes, so the command line can tell them from bugs; one for a
training run stopped on request."""


class SoftpromptError(ValueError):
    """A user mistake (a bad file, setting or input), with a one-line message naming it.

    The CLI prints the first line and exits with status 2; any other exception is a bug
    and keeps its full traceback (exit status 1).
    """


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint at `step`.

    A `KeyboardInterrupt`, so code that handles Ctrl-C handles it and no `except Exception`
    swallows it; the run can be resumed by running the same command again.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved")
        self.step = step
