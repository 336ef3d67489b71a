"""One error type for everything a user can get wrong, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable


class UserError(Exception):
    """Bad input or environment: the message says what was wrong and what to do. Printed as one line."""


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one `warning: ...` line, like an error (Python's default adds the file and the source line)."""
    label = "" if category is UserWarning else f"{category.__name__}: "
    return f"warning: {label}{message}\n"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run an entry point; a UserError becomes `error: ...` on stderr and exit code 2 (no traceback), a warning
    (a skipped unreadable image, say) one `warning: ...` line.

    Every entry point also gets the process-wide allocator settings of core/memory.py first."""
    from core.memory import tune_allocator

    tune_allocator()
    warnings.formatwarning = one_line_warning
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (its first line, else its type): what a UserError wraps when a
    third-party converter or runtime raises a multi-line or empty error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
