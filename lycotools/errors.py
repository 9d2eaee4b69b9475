"""Errors every command reports the same way: one line naming the file, a fixed exit status."""

from __future__ import annotations


class LycoError(Exception):
    """An error the CLI prints as one line: ``lycotools: error: <path>: <message>``."""

    exit_code = 1

    def __init__(self, path, message: str, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{where}{self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class BadInput(LycoError):
    """The input or the options are wrong: exit status 2."""

    exit_code = 2


def unexpected_line(e: BaseException, where: str | None = None) -> str:
    """The one line for an exception that is not a ``LycoError``: a missing package, or a bug.

    A missing package is never blamed on the file being processed (``where`` is left out), and a bug's
    message is cut to its first line so that no multi-line text (a C++ backtrace) reaches the terminal.
    """
    missing = _import_error(e)
    if missing is not None:
        name = missing.name or str(missing)
        return (f"a Python package lycotools needs is not installed: {name} "
                f"(hint: pip install {name.split('.')[0]}, or reinstall lycotools with its dependencies)")
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > 300:
        first = first[:300] + "…"
    prefix = f"{where}: " if where else ""
    return f"{prefix}internal error: {e.__class__.__name__}: {first} (run with --debug for the traceback)"


def _import_error(e: BaseException | None) -> ImportError | None:
    """The ImportError behind ``e``, if any (diffusers re-raises a failed import as a RuntimeError)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ImportError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None
