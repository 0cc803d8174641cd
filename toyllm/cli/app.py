"""The Typer application object and the error boundary shared by every subcommand.

Subcommand modules (`generate.py`, `bench.py`, `train.py`, ...) import `app` from here and register themselves;
`main.py` imports them all. Keeping the app in its own module avoids import cycles between them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

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


def print_error(message: str) -> None:
    """One red `error:` line on stderr; the message itself is never read as Rich markup (paths have brackets)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise: `raise fail("...")`."""
    print_error(message)
    return typer.Exit(code)


def run_guarded(main: Callable[[], object]) -> int:
    """The error boundary of the `toyllm` app and the seed scripts: a `ToyLLMError` is one line and exit code 2.

    Set TOYLLM_DEBUG=1 to see the traceback of an unexpected error.
    """
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ToyLLMError as exc:
        print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, with the way to get details
        if os.environ.get("TOYLLM_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]  # some errors carry a C++ stack trace: keep one line
        err_console.print(
            f"internal error: {type(exc).__name__}: {first} (set TOYLLM_DEBUG=1 for the traceback)",
            soft_wrap=True,
            markup=False,
        )
        return 1
    return 0


def run_app(argv: list[str] | None = None) -> int:
    return run_guarded(lambda: app(args=argv, prog_name="toyllm", standalone_mode=True))


def main() -> None:
    sys.exit(run_app())
