"""The one exception type for problems the user can fix (and the exit codes the CLI maps them to).

Raise :class:`DfkdError` where the problem is found, with a message that names the problem and
the fix in one line. Anything else that escapes is a bug and may show a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130


class DfkdError(Exception):
    """A user-facing problem: one-line ``message`` and the process ``exit_code``.

    Example:
        >>> raise DfkdError("teacher file 'x.pt' not found; check the path")
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class ExportError(DfkdError):
    """Export or parity check failed (exit code 3)."""

    exit_code = EXIT_RUNTIME


class GateFailed(DfkdError):
    """A quality gate such as ``--min-agreement`` was not met (exit code 1)."""

    exit_code = EXIT_GATE_FAILED


def shown(value: object, limit: int = 60, quote: bool = True) -> str:
    """``value`` fit for a one-line message: ``repr`` (which escapes newlines) when ``quote`` or
    when the text is not printable, cut after ``limit`` characters.

    Example:
        >>> shown("a\\nb")
        "'a\\\\nb'"
    """
    text = str(value)
    text = repr(value) if quote or not text.isprintable() else text
    return text if len(text) <= limit else f"{text[:limit]}..."
