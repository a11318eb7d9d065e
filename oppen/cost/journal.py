"""The settlement journal: each attempt's settlement on disk before it goes to the ledger.

If the ledger cannot be reached when a run ends (network, database restart), or the process
dies between measuring and booking, the settlement is still on disk, and `oppen ledger
reconcile` books it later. Booking is idempotent per attempt, so replaying an entry that did
reach the ledger changes nothing. On Kubernetes the journal lives on the checkpoint volume, so
it outlives the pod.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SAFE_NAME = str.maketrans({ch: "_" for ch in "/\\:"})


class JournalEntry(BaseModel):
    """Everything `Ledger.settle` needs to book one attempt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempt_id: str
    run_key: str
    team: str
    experiment: str
    charges_by_month: dict[str, int]
    status: str
    reason: str | None = None
    mlflow_run_id: str | None = None
    detail: dict = Field(default_factory=dict)
    recorded_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def cost_micros(self) -> int:
        return sum(self.charges_by_month.values())


class SettlementJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_of(self, attempt_id: str) -> Path:
        return self.directory / f"{attempt_id.translate(SAFE_NAME)}.json"

    def write(self, entry: JournalEntry) -> Path:
        """Atomically (temp file, fsync, rename): a crash leaves the old entry or the new one, never half of one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path_of(entry.attempt_id)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".entry-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(entry.model_dump_json(indent=2))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def done(self, attempt_id: str) -> None:
        self.path_of(attempt_id).unlink(missing_ok=True)

    def pending(self) -> Iterator[tuple[Path, JournalEntry | None]]:
        """Every entry not yet booked; None for a file that cannot be read (reported, never guessed at)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            try:
                yield path, JournalEntry.model_validate(json.loads(path.read_text()))
            except (OSError, ValueError, ValidationError):
                yield path, None
