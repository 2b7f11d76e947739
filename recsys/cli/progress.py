"""Progress bars and stage headers for long-running commands (rich, to stderr)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """Yields `update(done, total)`; the bar closes when the block ends."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as p:
        task = p.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            p.update(task, completed=done, total=total)

        yield update


@contextmanager
def stage(title: str) -> Iterator[None]:
    """A titled stage with its wall time."""
    console.rule(f"[bold]{title}")
    t = time.perf_counter()
    yield
    console.print(f"[dim]{title}: {time.perf_counter() - t:.1f} s[/dim]")
