"""User-facing errors and the command-line wrapper that turns them into one-line messages."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class HyqError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def check_positive(value: int | None, flag: str) -> None:
    """A HyqError unless `value` (given as `flag`) is None or at least 1."""
    if value is not None and value < 1:
        raise HyqError(f"{flag} must be at least 1, got {value}")


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a command's main(); a HyqError becomes `error: ...` on stderr and exit status 2."""
    try:
        main(argv)
    except HyqError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
