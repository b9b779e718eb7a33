"""Rendering results for the terminal: tables, JSON and CSV."""

from __future__ import annotations

import json
import math
from typing import Any

import click
import numpy as np
import pandas as pd

FORMATS = ("table", "json", "csv")


def jsonable(value: Any) -> Any:
    """Convert numpy/pandas values (recursively) into plain JSON types; NaN becomes null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return None if math.isnan(number) or math.isinf(number) else number
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (the stable machine-readable form)."""
    click.echo(json.dumps(jsonable(data), indent=2, ensure_ascii=False))


def echo_frame(frame: pd.DataFrame, fmt: str, *, index: bool = False) -> None:
    """Print a DataFrame as a table, JSON records or CSV."""
    if fmt == "json":
        records = (
            frame.reset_index().to_dict(orient="records")
            if index
            else frame.to_dict(orient="records")
        )
        echo_json(records)
    elif fmt == "csv":
        click.echo(frame.to_csv(index=index), nl=False)
    elif frame.empty:
        click.echo("(nothing)")
    else:
        with pd.option_context(
            "display.max_rows",
            None,
            "display.max_columns",
            None,
            "display.width",
            200,
            "display.max_colwidth",
            60,
        ):
            click.echo(frame.to_string(index=index, float_format=lambda x: f"{x:.3f}", na_rep="-"))


def shape_label(shape_key: tuple[int, int, int]) -> str:
    """``(3, 7, 7)`` → ``"3x7x7"``."""
    return "x".join(str(int(v)) for v in shape_key)


def parse_kernel(text: str | None) -> tuple[int, ...] | None:
    """``"7x7"`` → ``(7, 7)``; ``"3x7x7"`` → ``(3, 7, 7)``; ``"7"`` → ``(7, 7)``."""
    if not text:
        return None
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected KxK or CxKxK, e.g. 7x7 or 3x7x7") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) not in (2, 3) or min(parts) < 1:
        raise click.BadParameter(f"{text!r}: expected KxK or CxKxK, e.g. 7x7 or 3x7x7")
    return parts
