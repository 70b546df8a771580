"""The ``bt-transfer`` console script: the command line, with Ctrl-C handled from the first moment.

Kept free of heavy imports, so an interrupt while torch and the commands load is one line and
exit code 130, like an interrupt during a command.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Load the commands and run the one asked for."""
    try:
        from .app import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing written\n")
        raise SystemExit(130) from None
