"""Console entry point. The daemon commands need ``gevent.monkey.patch_all()`` before anything
else imports socket, ssl or threading (DESIGN §2); the other commands run unpatched."""

from __future__ import annotations

import sys

GEVENT_COMMANDS = frozenset({"run", "demo"})
OPTIONS_WITH_VALUE = frozenset({"--config", "--database-url"})


def command_name(argv: list[str]) -> str | None:
    """The sub-command in ``argv`` (skipping the root options and their values)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in OPTIONS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    if command_name(sys.argv[1:]) in GEVENT_COMMANDS:
        from gevent import monkey

        monkey.patch_all()
    from agent.cli.main import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
