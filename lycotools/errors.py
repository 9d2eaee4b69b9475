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


class InternalError(LycoError):
    """The work failed for a reason inside lycotools: exit status 1."""

    exit_code = 1
