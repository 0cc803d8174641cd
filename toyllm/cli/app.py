"""The Typer application object and the error boundary shared by every subcommand.

Subcommand modules (`generate.py`, `bench.py`, `train.py`, ...) import `app` from here and register themselves;
`main.py` imports them all. Keeping the app in its own module avoids import cycles between them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from toyllm.errors import ToyLLMError

app = typer.Typer(
    name="toyllm",
    help="A small, fast, readable GPT-2: generate, benchmark, train and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)

err_console = Console(stderr=True, highlight=False)

# Usage errors are raised by the click that typer runs on: recent typers carry their own copy (typer._click), older
# ones use the click package.
try:
    _click: Any = importlib.import_module("typer._click")
except ImportError:
    _click = importlib.import_module("click")


def print_error(message: str) -> None:
    """One red `error:` line on stderr; the message itself is never read as Rich markup (paths have brackets)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise: `raise fail("...")`."""
    print_error(message)
    return typer.Exit(code)


def run_guarded(main: Callable[[], object]) -> int:
    """The error boundary of the `toyllm` app and the seed scripts: a `ToyLLMError`, a mistyped option and a file
    system error (a folder that is a file, no permission, a full disk) are one line and exit code 2.

    Set TOYLLM_DEBUG=1 to see the traceback of an unexpected error.
    """
    try:
        code = main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ToyLLMError as exc:
        print_error(str(exc))
        return 2
    except _click.exceptions.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a command given nothing: its help is already printed
            return 2
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        print_error(" ".join(exc.format_message().split()) + hint)
        return 2
    except _click.exceptions.ClickException as exc:  # e.g. an unreadable file given to a typer.FileText option
        print_error(" ".join(exc.format_message().split()))
        return exc.exit_code
    except BrokenPipeError:  # `toyllm generate ... | head`: the reader left; say nothing, as other tools do
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout at exit: point it somewhere)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except Exception as exc:
        if any(cls.__name__ == "Abort" for cls in type(exc).__mro__):  # click's Ctrl-C or end of input (older typer)
            err_console.print("interrupted", markup=False)
            return 130
        if os.environ.get("TOYLLM_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.filename is not None:  # the file system refused one of the user's paths:
            print_error(str(exc))  # a folder that is a file, no permission, a full disk
            return 2
        # An unexpected failure: still one line, with the way to get details.
        first = (str(exc).strip().splitlines() or [""])[0]  # some errors carry a C++ stack trace: keep one line
        err_console.print(
            f"internal error: {type(exc).__name__}: {first} (set TOYLLM_DEBUG=1 for the traceback)",
            soft_wrap=True,
            markup=False,
        )
        return 1
    return code if isinstance(code, int) and not isinstance(code, bool) else 0  # an Exit's code comes back as a value


def run_app(argv: list[str] | None = None) -> int:
    # standalone_mode=False: click hands usage errors to run_guarded (one line) instead of printing a boxed usage
    # text, and returns a command's `typer.Exit(code)` as the code.
    return run_guarded(lambda: app(args=argv, prog_name="toyllm", standalone_mode=False))


def main() -> None:
    sys.exit(run_app())
