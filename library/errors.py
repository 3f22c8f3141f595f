"""The one place user-facing errors are defined and printed.

A `UserError` carries one paragraph: what is wrong, which file or flag, and the fix. Entry scripts
wrap `main()` in `run_cli`, which prints the paragraph without a traceback (unless `--debug` is on
the command line or `SDT_DEBUG=1`) and exits with status 2.
"""
from __future__ import annotations

import os
import sys
import textwrap


class UserError(Exception):
    """An error caused by the user's input, with the fix in its message."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [message.strip()]
        if self.path and self.path not in message:
            parts.append(f"File: {self.path}.")
        if fix:
            parts.append(f"Fix: {fix.strip()}")
        super().__init__(" ".join(parts))


def format_user_error(err: BaseException) -> str:
    text = str(err)
    return "\n".join(textwrap.wrap("error: " + text, width=100, break_long_words=False,
                                   break_on_hyphens=False))


def debug_enabled(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("SDT_DEBUG", "") not in ("", "0")


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; turn UserError into a clean message and exit code 2."""
    from library.cpu_threads import apply_default

    apply_default()   # before main imports torch: a sane thread count when the user set none
    try:
        result = main(argv)
        return result if isinstance(result, int) else 0
    except UserError as err:
        if debug_enabled(argv):
            raise
        print(format_user_error(err), file=sys.stderr, flush=True)
        return 2
