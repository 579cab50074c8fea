"""The `edge-ms` executable (and ``python -m edge_ms``): the CLI, with Ctrl-C caught while it imports.

The commands turn Ctrl-C into "interrupted" and exit 130 themselves; this covers the moment
before they run, while click and the CLI module are still being imported.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from edge_ms.cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli()


if __name__ == "__main__":
    main()
