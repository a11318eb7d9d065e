"""The cost report: ledger rows joined with run quality, per team / experiment / date range (pandas)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from oppen.display import usd

COLUMNS = [
    "created_at", "team", "experiment", "workload", "status", "attempts", "quote_usd", "actual_usd", "actual_micros",
    "metric", "value", "cost_per_point_usd", "mlflow_run_id", "reservation_id",
]


def build_frame(rows: Sequence[Mapping], quality: Mapping[str, tuple[str, float, float | None]]) -> pd.DataFrame:
    """One row per run that spent money. `quality` maps an MLflow run id to (metric, value, cost_per_point)."""
    records = []
    for row in rows:
        if row["status"] in ("refused", "reserved"):
            continue  # nothing was spent (refused) or is not known yet (still running)
        metric, value, per_point = quality.get(row.get("mlflow_run_id") or "", (None, None, None))
        records.append({
            "created_at": pd.Timestamp(row["created_at"]).tz_localize("UTC")
            if pd.Timestamp(row["created_at"]).tzinfo is None else pd.Timestamp(row["created_at"]).tz_convert("UTC"),
            "team": row["team"], "experiment": row["experiment"], "workload": row.get("workload", ""),
            "status": row["status"], "attempts": row.get("attempts", 1),
            # Sums are taken over the exact integer micro-dollars; the float column is for reading.
            "quote_usd": float(row["quote_usd"]), "actual_usd": float(row["actual_usd"] or 0.0),
            "actual_micros": int(row.get("spent_micros", round(float(row["actual_usd"] or 0.0) * 1e6))),
            "metric": metric, "value": value, "cost_per_point_usd": per_point,
            "mlflow_run_id": row.get("mlflow_run_id"), "reservation_id": row["id"],
        })
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Totals per team and experiment."""
    if frame.empty:
        return pd.DataFrame(columns=["team", "experiment", "runs", "actual_usd", "quote_usd", "mean_cost_per_point_usd"])
    grouped = frame.groupby(["team", "experiment"], as_index=False).agg(
        runs=("reservation_id", "count"), actual_micros=("actual_micros", "sum"), quote_usd=("quote_usd", "sum"),
        mean_cost_per_point_usd=("cost_per_point_usd", "mean"),
    )
    grouped.insert(3, "actual_usd", grouped.pop("actual_micros") / 1_000_000)  # from an exact integer sum
    return grouped.sort_values("actual_usd", ascending=False, ignore_index=True)


def trend(frame: pd.DataFrame, min_runs: int = 3) -> tuple[str, float | None]:
    """Improving / degrading / flat cost per quality point, from a least-squares slope over runs in time order.

    The slope is relative (fraction of the mean cost per point, per run) so teams of any size compare.
    """
    points = frame.dropna(subset=["cost_per_point_usd"]).sort_values("created_at")
    if len(points) < min_runs:
        return f"not enough runs with a quality metric ({len(points)} < {min_runs})", None
    y = points["cost_per_point_usd"].to_numpy(dtype=float)
    slope = float(np.polyfit(np.arange(len(y)), y, 1)[0]) / float(np.mean(y))
    if slope < -0.01:
        return "improving", slope
    if slope > 0.01:
        return "degrading", slope
    return "flat", slope


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-style table (pandas' to_markdown needs tabulate, which we do not ship), for people:
    dollar columns (`*_usd`) in Oppen's money format, column names in words."""
    def cell(column: str, value) -> str:
        if isinstance(value, float):
            if np.isnan(value):
                return ""
            return usd(value) if column.endswith("_usd") else f"{value:,.4g}"
        return str(value)

    def title(column: str) -> str:
        return column.removesuffix("_usd").replace("_", " ") + (" ($)" if column.endswith("_usd") else "")

    header = "| " + " | ".join(title(str(c)) for c in frame.columns) + " |"
    rule = "|" + " --- |" * len(frame.columns)
    body = ["| " + " | ".join(cell(str(c), v) for c, v in zip(frame.columns, row)) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
