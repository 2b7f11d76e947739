"""The `recsys` command line: the composition root (may import pipelines and service, inside commands)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="recsys",
    help="Lifelong-sequence CTR models: data, training, evaluation, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """recsys: DARE / TWIN / DIN with Aaren and Titans over lifelong user histories."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
