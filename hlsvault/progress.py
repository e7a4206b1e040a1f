"""Progress bars on a terminal: one per stage, fed from the job record."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from pipeline.jobs import JobRecord

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class StageProgress:
    """A bar per stage of a job, created as stages appear in the record.

    Disabled (no terminal, or ``--json``), it does nothing and never imports rich.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self._progress = Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
                transient=False,
            )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StageProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, record: JobRecord) -> None:
        if self._progress is None:
            return
        for stage in record.stages:
            task = self._tasks.get(stage.name)
            if task is None:
                task = self._progress.add_task(stage.name, total=1.0, status=stage.status)
                self._tasks[stage.name] = task
            done = 1.0 if stage.status in ("done", "skipped") else stage.progress
            self._progress.update(task, completed=done, status=stage.status)
