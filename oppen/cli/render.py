"""How results look in a terminal (rich) and to a script (`--json`), by one set of conventions.

A result is a pydantic model or a list of them. With `--json` it is printed as JSON, exactly the API's
model (micro-dollars included), for scripts and agents. Otherwise:
- a list becomes a table, one row per item, its columns the item's simple fields;
- a model becomes a two-column table of its fields, with nested lists as tables below it;
- `*_micros` fields are money, shown with `format_usd` (every micro-dollar below a dollar), and their
  `*_usd` twins are left out; a lone `*_usd` float is shown the same way;
- `fraction*` and `*_fraction` fields are percentages; datetimes are shown to the second in UTC;
- names lose their underscores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=False)
errors = Console(stderr=True, soft_wrap=True)


def as_jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, (list, tuple)):
        return [as_jsonable(item) for item in result]
    if isinstance(result, dict):
        return {key: as_jsonable(value) for key, value in result.items()}
    if isinstance(result, Decimal):
        return str(result)
    if isinstance(result, datetime):
        return result.isoformat()
    return result


def print_json(result: Any) -> None:
    # Plain print: rich would wrap long lines and colour them, and scripts parse this.
    print(json.dumps(as_jsonable(result), indent=2, sort_keys=False))


def label(name: str) -> str:
    return name.removesuffix("_micros").removesuffix("_usd").replace("_", " ")


def money(micros: int | None) -> str:
    from oppen.cost.money import format_usd

    return format_usd(micros)


def cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name.endswith("_micros") and isinstance(value, int):
        return money(value)
    if name.endswith("_usd") and isinstance(value, (int, float, Decimal)):
        from oppen.cost.money import to_micros

        return money(to_micros(value)) if math.isfinite(float(value)) and value >= 0 else f"{value}"
    if (name.startswith("fraction") or name.endswith("fraction") or name.endswith("_share")) and isinstance(value, float):
        return f"{value:.1%}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S") + ("" if value.tzinfo is None else " UTC" if value.utcoffset().total_seconds() == 0 else value.strftime(" %z"))
    if isinstance(value, BaseModel):
        return ", ".join(f"{label(k)} {cell(k, v)}" for k, v in _fields(value) if _simple(v))
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(k, v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(name, item) for item in value)
    return str(value)


def _fields(model: BaseModel) -> list[tuple[str, Any]]:
    names = list(type(model).model_fields)
    shown = []
    for name in names:
        value = getattr(model, name)
        if name.endswith("_usd") and f"{name[:-4]}_micros" in names:
            continue  # the exact twin is shown instead
        shown.append((name, value))
    return shown


def _simple(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(not isinstance(item, (BaseModel, dict, list)) for item in value) and len(value) <= 8
    return not isinstance(value, BaseModel) or len(type(value).model_fields) <= 6


def table(rows: Sequence[BaseModel], title: str | None = None, columns: Iterable[str] | None = None) -> Table:
    grid = Table(title=title, title_justify="left", header_style="bold")
    if not rows:
        grid.add_column("(none)")
        return grid
    names = list(columns) if columns else [n for n, v in _fields(rows[0]) if _simple(v) and not isinstance(v, dict)]
    for name in names:
        numeric = isinstance(getattr(rows[0], name, None), (int, float, Decimal)) and not isinstance(
            getattr(rows[0], name, None), bool)
        grid.add_column(label(name), justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        grid.add_row(*(cell(name, getattr(row, name, None)) for name in names))
    return grid


def show(result: Any, json_output: bool, title: str | None = None, columns: Iterable[str] | None = None) -> None:
    """Print a result as JSON or as rich tables."""
    if json_output:
        print_json(result)
        return
    if isinstance(result, (list, tuple)):
        console.print(table(list(result), title, columns))
        return
    details = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    details.add_column(style="bold")
    details.add_column(overflow="fold")
    nested: list[tuple[str, list]] = []
    for name, value in _fields(result):
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], BaseModel):
            nested.append((name, list(value)))
        elif isinstance(value, BaseModel) and not _simple(value):
            nested.append((name, [value]))
        else:
            details.add_row(label(name), cell(name, value))
    console.print(details)
    for name, rows in nested:
        console.print(table(rows, label(name)))


def fail(message: str) -> None:
    errors.print(f"[bold red]oppen:[/] {message}", highlight=False)
