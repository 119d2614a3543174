"""The scripts' contract with users: a mistake the user can fix is one clear message and exit code 2,
never a traceback. A bug in qat still gives a traceback (exit 1), so the two are never confused.

    from qat.cli import UserError, run_main

    def main(argv: list[str] | None = None) -> int: ...

    if __name__ == "__main__":
        run_main(main)
"""
from __future__ import annotations

import errno
import sys
from typing import Callable, NoReturn, Optional, Sequence

__all__ = ["UserError", "USAGE_EXIT", "run_main", "fail"]

USAGE_EXIT = 2  # as argparse uses for bad arguments


class UserError(Exception):
    """Bad input the user can fix (a recipe key, a missing file, a setting the model cannot take).

    The message is complete on its own: it names what is wrong, where, and what to do.
    """


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT)


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run ``main(argv)``; user errors (``UserError`` and ``qat.QuantError``) and a full disk become one
    message and exit 2."""
    from .formats import QuantError  # a scheme a layer cannot take is the user's to fix too

    try:
        code = main(argv)
    except (UserError, QuantError) as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        fail(f"no space left on the device{where}: free some space, or write elsewhere (output_dir=, --out)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    raise SystemExit(code or 0)
