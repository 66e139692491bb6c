"""What every ``dfkd`` command shares: one-line errors with their exit codes, and the output-format switch.

Exit codes: 0 success, 1 a quality gate failed, 2 bad input or usage, 3 runtime or export failure,
130 interrupted.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from typing import Annotated, Any, Callable

import typer
from typer.core import TyperGroup

from dfkd_cli import interrupts
from dfkd_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DfkdError

# Typer vendors click in recent versions and uses the click package in older ones: take the
# exception classes from Typer's own BadParameter.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, an unknown option) as one ``error:`` line, exit 2, like
    every other dfkd error, instead of click's usage box."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERROR as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # plain `dfkd`: the help, as usual
                return super().main(args, prog_name, complete_var, standalone_mode=standalone_mode, **extra)
            where = f"; see `{err.ctx.command_path} --help`" if err.ctx is not None else ""
            print_error(f"{err.format_message()}{where}")
            sys.exit(2)
        except typer.Abort:
            print_error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except _CLICK_EXCEPTION as err:
            print_error(err.format_message())
            sys.exit(err.exit_code)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


class OutputFormat(str, Enum):
    human = "human"
    json = "json"
    quiet = "quiet"


FormatOption = Annotated[OutputFormat, typer.Option("--format", "-f", help="human, json (results on stdout) or quiet.")]


def print_error(message: str) -> None:
    # Never imports torch: this also runs when Ctrl-C cut torch's own import short.
    one_line = " ".join(message.split("\n"))
    print(f"error: {interrupts.rank_prefix()}{one_line}", file=sys.stderr)


def fail(message: str, code: int) -> None:
    print_error(message)
    raise typer.Exit(code)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DfkdError into one line on stderr with its exit code, and Ctrl-C into exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DfkdError as err:
            fail(err.message, err.exit_code)
        except KeyboardInterrupt as err:
            fail(f"interrupted by {interrupts.signal_name(err)}", EXIT_INTERRUPTED)
        except (MemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            fail("out of memory (" + (str(err).split("\n")[0][:120] or type(err).__name__) + "); lower "
                  "train.batch_size or synth.batch_size (-s train.batch_size=64), or use a smaller student", EXIT_RUNTIME)

    return wrapper


def out_of_memory(err: BaseException) -> bool:
    """CUDA and CPU allocation failures (torch raises both as RuntimeError subclasses)."""
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text)


def check_gate(report: dict[str, Any]) -> None:
    gate = report.get("gate")
    if gate and not gate["passed"]:
        fail(f"agreement {gate['measured']:.4f} on {gate['measured_on']} is below --min-agreement {gate['min_agreement']}", 1)
