"""The `edge-ms` command. Thin: each command parses arguments and calls one library function."""

from __future__ import annotations

import functools
import sys

import click

from edge_ms.errors import EdgeMSError


def _one_line_errors(fn):
    """Turn EdgeMSError into one line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeMSError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="edge-ms")
def main() -> None:
    """Reflective reasoning on device: sample N trajectories, score every step with the SPRM, keep the best."""


# Commands are registered below, one small function each.
