"""Turn the errors a user can cause into one clear line and exit status 2 (no traceback)."""

from __future__ import annotations

import functools
import sys

import typer


def user_errors() -> tuple[type[BaseException], ...]:
    from recsys.config.base import ConfigError
    from recsys.data.report import BadInputError
    from recsys.data.sequences import DatasetError

    from recsys.data.fetch import FetchError

    errors: list[type[BaseException]] = [ConfigError, BadInputError, DatasetError, FetchError, FileNotFoundError,
                                         NotADirectoryError, PermissionError, ValueError]
    try:
        from recsys.bundle import BundleError

        errors.append(BundleError)
    except ImportError:
        pass
    try:
        import redis

        errors.append(redis.exceptions.ConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def friendly(fn):
    """Decorator for commands: known user errors -> `error: ...` on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except user_errors() as e:
            msg = str(e).strip() or type(e).__name__
            if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
                msg = f"{e.filename}: {msg}"
            # A config with several bad keys names each on its own line; every line reads as an error.
            typer.echo("\n".join(f"error: {line}" for line in msg.splitlines()), err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # e.g. port in use
            typer.echo(f"error: {e.strerror or e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)
