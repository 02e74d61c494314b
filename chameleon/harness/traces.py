"""Trace files in the Azure LLM inference format (`TIMESTAMP, ContextTokens, GeneratedTokens`).

The bundled Splitwise traces (CC-BY 4.0) are found with `importlib.resources`, so they work from a
source tree and an installed wheel alike. Format details: `docs/workloads.md`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import importlib.resources
import importlib.resources.abc
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import attrs

TRACE_FILES: dict[str, str] = {
    "conv": "AzureLLMInferenceTrace_conv.csv",
    "code": "AzureLLMInferenceTrace_code.csv",
}


@attrs.frozen
class TraceRow:
    timestamp_s: float  # seconds since the Unix epoch (the trace's clock read as UTC)
    context_tokens: int
    generated_tokens: int


_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch for `YYYY-MM-DD HH:MM:SS.fffffff` (any fraction digits) or a number."""
    s = text.strip()
    m = _TS_RE.match(s)
    if m is None:
        try:
            return float(s)
        except ValueError:
            raise ValueError(f"unparseable timestamp {text!r}") from None
    y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
    whole = _dt.datetime(y, mo, d, h, mi, sec, tzinfo=_dt.timezone.utc).timestamp()
    frac = m.group(7)
    fraction = int(frac) / 10 ** len(frac) if frac else 0.0  # datetime keeps only 6 digits: do it by hand
    return whole - _tz_offset_s(m.group(8)) + fraction


def _tz_offset_s(tz: str | None) -> float:
    if tz is None or tz == "Z":
        return 0.0
    sign = -1.0 if tz[0] == "-" else 1.0
    digits = tz[1:].replace(":", "")
    return sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)


def bundled_trace_path(name: str) -> Path:
    """Path of a bundled trace ("conv" or "code"), found with importlib.resources."""
    if name not in TRACE_FILES:
        raise KeyError(f"unknown bundled trace {name!r}; choose from {sorted(TRACE_FILES)}")
    return Path(str(_bundled_resource(name)))  # a real file for every ordinary (non-zipped) install


def load_trace(path_or_name: str | os.PathLike[str]) -> list[TraceRow]:
    """Rows of a trace CSV in file order. "conv"/"code" name the bundled traces; else a path."""
    if isinstance(path_or_name, str) and path_or_name in TRACE_FILES:
        return list(_load_bundled(path_or_name))
    with open(path_or_name, encoding="utf-8-sig", newline="") as f:
        return parse_trace_csv(f)


def _bundled_resource(name: str) -> importlib.resources.abc.Traversable:
    return importlib.resources.files("chameleon.data").joinpath("traces").joinpath(TRACE_FILES[name])


@functools.lru_cache(maxsize=None)
def _load_bundled(name: str) -> tuple[TraceRow, ...]:
    text = _bundled_resource(name).read_text(encoding="utf-8-sig")
    return tuple(parse_trace_csv(io.StringIO(text, newline="")))


def parse_trace_csv(f: TextIO) -> list[TraceRow]:
    """Parse `TIMESTAMP, ContextTokens, GeneratedTokens` (header names case/space-insensitive)."""
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        return []
    cols = _columns(header)
    rows = []
    for line in reader:
        if not line or not "".join(line).strip():
            continue
        rows.append(
            TraceRow(
                timestamp_s=parse_timestamp(line[cols[0]]),
                context_tokens=int(float(line[cols[1]])),
                generated_tokens=int(float(line[cols[2]])),
            )
        )
    return rows


def _columns(header: Sequence[str]) -> tuple[int, int, int]:
    keys = [h.strip().lower() for h in header]
    try:
        return keys.index("timestamp"), keys.index("contexttokens"), keys.index("generatedtokens")
    except ValueError:
        raise ValueError(f"trace header must hold TIMESTAMP, ContextTokens, GeneratedTokens; got {header}") from None


def trace_label(path_or_name: str | os.PathLike[str]) -> str:
    return os.fspath(path_or_name)
