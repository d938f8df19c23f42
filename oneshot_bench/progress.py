"""A small wrapper over rich's progress bar that `quiet=True` turns into a no-op."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as RichProgress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Progress:
    """Context manager: `with Progress("encode", total=n, quiet=q) as bar: bar.advance(k)`.

    Draws on stderr so that stdout stays clean for tables and JSON.
    """

    def __init__(self, description: str, total: int, quiet: bool = False, unit: str = "it") -> None:
        self.description, self.total, self.quiet, self.unit = description, total, quiet, unit
        self._rich: RichProgress | None = None
        self._task = None

    def __enter__(self) -> "Progress":
        if not self.quiet:
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, rate="", status="")
        return self

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self._rich is None:
            return
        self._rich.advance(self._task, n)
        task = self._rich.tasks[0]
        rate = f"{task.speed:,.0f} {self.unit}/s" if task.speed else ""
        fields = {"rate": rate}
        if status is not None:
            fields["status"] = status
        self._rich.update(self._task, **fields)

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
