"""What every command shares: one-line errors, quiet TensorFlow, progress bars on or off.

``cli.py`` and the command groups beside it (``cli_lungs.py``) import these; an expected
error (a :class:`~covfeat.core.errors.CovfeatError`) becomes one line on stderr, never a
traceback.
"""

from __future__ import annotations

import os

import typer

from covfeat.core.errors import CovfeatError
from covfeat.core.quiet import import_tensorflow


def fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def check(fn, *args, **kwargs):
    """Build or check settings (no TensorFlow): a bad value is one line, before any work."""
    try:
        return fn(*args, **kwargs)
    except CovfeatError as exc:
        fail(str(exc))


def guard(fn, *args, tensorflow: bool = True, **kwargs):
    """Run a library call; expected errors become one line on stderr and exit code 1.
    With ``tensorflow`` it is imported first, quietly, before library code could import it
    noisily.  Calls that may not need it (extract on a complete cache, info, verify, clean,
    fit-head on a warm template) pass ``tensorflow=False`` and import it quietly themselves,
    right before first use: its import is seconds, the whole of a no-op's cost."""
    if tensorflow:
        import_tensorflow()
    try:
        return fn(*args, **kwargs)
    except CovfeatError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; finished work is kept, run the same command again to resume.", 130)


def progress() -> bool:
    return not os.environ.get("COVFEAT_NO_PROGRESS")
