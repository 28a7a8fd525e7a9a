"""`rmt`: tune, predict, export, info, sample, eval (the library); serve, worker, migrate (the service); remote.

Only the subcommand that runs imports its heavy modules: `rmt predict` and `rmt serve` never import torch, and
`rmt remote` needs only httpx.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rmt_core import cli as library

from . import remote

# The service's commands live in their own packages, each with its own parser: argv is forwarded as is.
SERVICE = {
    "serve": ("app.server", "Run the HTTP API (and, with the embedded broker, a worker)."),
    "worker": ("worker.main", "Run a Celery tuning worker."),
    "migrate": ("rmt_service.migrate", "Create or upgrade the service's records database (once per deploy)."),
}


def settings_problem(exc) -> str:
    """A pydantic ValidationError of the service's Settings as one line per bad RMT_* variable."""
    lines = []
    for error in exc.errors():
        name = "RMT_" + "_".join(str(part) for part in error.get("loc", ())).upper()
        lines.append(f"{name}={error.get('input')!r}: {error.get('msg', 'invalid')}")
    return "invalid configuration (environment or .env):\n  " + "\n  ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    library.add_commands(sub)
    remote.add_parser(sub)
    for name, (_, help_text) in {**library.DISPATCH, **SERVICE}.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in library.DISPATCH:
        return library.main(argv)
    if argv and argv[0] in SERVICE:
        from pydantic import ValidationError

        module = importlib.import_module(SERVICE[argv[0]][0])
        try:
            return int(module.main(argv[1:]) or 0)
        except ValidationError as exc:  # invalid RMT_* settings: one line each, no traceback
            return library.fail(settings_problem(exc))
    return library.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
