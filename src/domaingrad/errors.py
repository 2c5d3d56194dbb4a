"""Errors meant for the user: each says what was expected and what to do."""

from __future__ import annotations

import sys


class DomainGradError(Exception):
    """A problem with the user's input or files; the CLI prints it without a traceback."""


class DomainGradWarning(UserWarning):
    """Something that runs but is very likely not what the user meant; the CLI prints it
    as ``domaingrad: warning: ...`` on stderr (see :func:`show_warnings_plainly`)."""


class NonFiniteLossError(DomainGradError):
    """Training produced a NaN or infinite loss.

    Attributes:
        step: the training step (0-based) whose update returned the non-finite value.
        values: the values returned by that step's ``update``.
    """

    def __init__(self, step: int, values: dict[str, float], last_checkpoint_step: int | None):
        self.step = step
        self.values = values
        kept = (
            "no checkpoint was written yet"
            if last_checkpoint_step is None
            else f"the last good checkpoint (step {last_checkpoint_step}) and its results are kept"
        )
        bad = ", ".join(f"{k}={v}" for k, v in values.items())
        super().__init__(
            f"training stopped: a non-finite value at step {step} ({bad}); {kept}. "
            "Lower the learning rate (--hparams '{\"lr\": ...}') or check the data; "
            "the run is not marked done."
        )


def report_error(exc: DomainGradError) -> int:
    """Print ``exc`` as the command line does and return its exit code: 1 for a
    non-finite loss (the run stopped), 2 for any other user error."""
    print(f"domaingrad: error: {exc}", file=sys.stderr)
    return 1 if isinstance(exc, NonFiniteLossError) else 2


def show_warnings_plainly() -> None:
    """Print :class:`DomainGradWarning` s as ``domaingrad: warning: MESSAGE`` on stderr
    (no file and line: they are about the user's input, not the code); other warnings
    keep Python's format. The command line calls this once at start-up."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, DomainGradWarning):
            print(f"domaingrad: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
