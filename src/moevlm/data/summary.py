"""What a run did with its data, said once at its start: the rows read, the rows dropped by
reason (bad rows skipped with ``data.on_bad_row=skip``, duplicates dropped with
``data.dedupe=drop``), each reason with its first example, and the training and validation
counts. Every row read is in exactly one of dropped, train and validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from moevlm.data.records import SkippedRows


@dataclass
class DataSummary:
    rows_read: int
    train_rows: int
    val_rows: int
    dropped: SkippedRows = field(default_factory=SkippedRows)

    def line(self) -> str:
        """E.g. ``data: read 30 rows; dropped 9: 9 duplicate row (first: d.json row 22: duplicate row: same
        image and text as row 12); train 19 rows, validation 2 rows``."""
        dropped = f"dropped {len(self.dropped)}: {self.dropped.reasons()}" if self.dropped else "dropped 0"
        return (f"data: read {self.rows_read} rows; {dropped}; train {self.train_rows} rows, "
                f"validation {self.val_rows} rows")

    def params(self) -> dict[str, int | str]:
        """The summary as MLflow params (``data.*``)."""
        return {"rows_read": self.rows_read, "rows_dropped": len(self.dropped),
                "dropped_reasons": self.dropped.reasons() or "none", "train_rows": self.train_rows,
                "val_rows": self.val_rows}
