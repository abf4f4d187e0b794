"""Problems a user can fix, and how the command-line entry points report them: one line, no traceback.

    python -m drg_llama.predict --run runs/two_label/version_0 --input notes.csv --output drgs.csv --debug

A bad file, option or run folder raises :class:`UserError` (or ``FileNotFoundError``) with one sentence that names
the file and what to do; every entry point prints it as ``error: ...`` and exits with status 2. ``--debug`` shows the
traceback instead. Messages never quote note text: a note can identify a patient.
"""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem with the user's input, options or files, told in one sentence that names what to do."""


#: What the entry points report in one line. A missing file is always the user's to fix, wherever it is found.
USER_ERRORS = (UserError, FileNotFoundError)


def report_error(err: BaseException, debug: bool) -> int:
    """Print ``err`` as one line on stderr and return the exit status 2; with ``debug``, re-raise it instead."""
    if debug:
        raise err
    print(f"error: {err}", file=sys.stderr)
    return 2


__all__ = ["USER_ERRORS", "UserError", "report_error"]
