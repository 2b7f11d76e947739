"""The `recsys` command line: the composition root.

It may import pipelines and service (inside each command, so `import recsys` and `recsys --help` stay
light); nothing imports it. Errors a user can cause print one line and exit with status 2.
"""

from recsys.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
