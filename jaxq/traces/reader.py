"""Read an LLM request trace (one request a row) into a :class:`Trace`.

Two schemas, told apart by the header row (cells compared without surrounding spaces, case ignored):

* **Azure** (Microsoft's AzurePublicDataset LLM inference traces, e.g. ``AzureLLMInferenceTrace_conv.csv``)::

      TIMESTAMP,ContextTokens,GeneratedTokens
      2023-11-16 18:15:46.6805900,374,44

  ``TIMESTAMP`` is a date and time of day, ``YYYY-MM-DD HH:MM:SS[.fffffffff]`` (a ``T`` may replace the
  space), parsed by ``numpy.datetime64`` at nanosecond precision: exact for the trace's 7 fractional
  digits (100 ns). ``ContextTokens`` is the prompt length, ``GeneratedTokens`` the output length.

* **Generic**::

      arrival_s,prompt_tokens,output_tokens[,class]
      0.0,374,44,chat

  ``arrival_s`` is the arrival time in seconds (a finite decimal number, any origin); ``prompt_tokens``
  and ``output_tokens`` as above; the optional ``class`` column is a non-empty label per request.

Both: UTF-8 (a byte-order mark is ignored), comma-separated, no quoting, one header row, blank lines
ignored, rows in arrival order (equal times allowed). Token counts are integers >= 1. Arrival times are
returned in seconds from the first request, float64.

A bad row (an unparsable time, a token count that is not an integer >= 1, a wrong number of fields, a
time earlier than the row before it) raises ``ValueError`` naming the file, the line (1-based, the header
is line 1) and the column. With ``drop_bad=True`` bad rows are dropped instead and counted
(:attr:`Trace.dropped`, by reason in :attr:`Trace.drop_reasons`). A row out of order is one earlier than
the latest row kept before it, so after a row whose time is far in the future every later row is dropped:
the count says so.

A clean file is parsed by NumPy's C reader (``np.loadtxt``) and checked column by column; a file with a
bad row is re-read with a split per line and vectorised string conversions, so that every bad row is
found with its line (only a column that fails is walked row by row). A million clean rows read in about
a second, with bad rows in a few.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GENERIC_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
GENERIC_CLASS_COLUMN = "class"
SCHEMAS = ("azure", "generic")


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """Requests of a trace, in arrival order. ``arrival_s[0] == 0``: times are seconds from the first
    request (``origin`` says when that was, as written in the file). ``labels`` holds the generic
    schema's ``class`` column (None when absent). ``dropped`` rows were bad and left out
    (``drop_bad=True``); ``drop_reasons`` counts them by reason."""

    arrival_s: np.ndarray = dataclasses.field(repr=False)  # float64, seconds from the first request
    prompt_tokens: np.ndarray = dataclasses.field(repr=False)  # int64 >= 1
    output_tokens: np.ndarray = dataclasses.field(repr=False)  # int64 >= 1
    labels: np.ndarray | None = dataclasses.field(default=None, repr=False)  # str, one per request
    source: str = ""
    schema: str = "generic"
    origin: str = "0"
    dropped: int = 0
    drop_reasons: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.arrival_s)
        for name in ("prompt_tokens", "output_tokens") + (("labels",) if self.labels is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trace.{name}: must have one entry per request ({n}), got {len(getattr(self, name))}")
        if n == 0:
            raise ValueError("Trace: must hold at least one request")

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Span of the arrivals, last minus first (s)."""
        return float(self.arrival_s[-1] - self.arrival_s[0])


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _detect_schema(path: Path, line: int, header: list[str]) -> tuple[str, tuple[str, ...]]:
    cells = tuple(h.strip().lower() for h in header)
    if cells == tuple(c.lower() for c in AZURE_COLUMNS):
        return "azure", AZURE_COLUMNS
    if cells == GENERIC_COLUMNS:
        return "generic", GENERIC_COLUMNS
    if cells == GENERIC_COLUMNS + (GENERIC_CLASS_COLUMN,):
        return "generic", GENERIC_COLUMNS + (GENERIC_CLASS_COLUMN,)
    raise ValueError(
        f"{path}: line {line}: unknown header {','.join(h.strip() for h in header)!r}; expected "
        f"{','.join(AZURE_COLUMNS)!r} (Azure) or {','.join(GENERIC_COLUMNS)}[,{GENERIC_CLASS_COLUMN}] "
        "(generic; see docs/traces.md)"
    )


# -- column parsers: strings in, (values, ok mask) out; vectorised, row by row only on failure --------


def _elementwise(cells: np.ndarray, one: Callable, fill, dtype) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(len(cells), fill, dtype=dtype)
    ok = np.zeros(len(cells), dtype=bool)
    for k, s in enumerate(cells):
        try:
            out[k] = one(s)
            ok[k] = True
        except (ValueError, OverflowError):
            pass
    return out, ok


def _parse_tokens(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        values = cells.astype(np.int64)
        ok = np.ones(len(cells), dtype=bool)
    except (ValueError, OverflowError):
        values, ok = _elementwise(cells, lambda s: np.int64(int(s)), 0, np.int64)
    return values, ok & (values >= 1)


def _parse_seconds(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values, _ = _elementwise(cells, float, np.nan, np.float64)
    return values, np.isfinite(values)


def _parse_timestamps(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nanoseconds since the epoch (int64). A cell must hold a time of day, not a date alone."""
    nat = np.datetime64("NaT", "ns")
    with warnings.catch_warnings():  # a timezone suffix is converted to UTC, with a deprecation warning
        warnings.simplefilter("ignore")
        try:
            stamps = cells.astype("datetime64[ns]")
        except (ValueError, OverflowError):
            stamps, _ = _elementwise(cells, lambda s: np.datetime64(s.strip(), "ns"), nat, "datetime64[ns]")
    ok = ~np.isnat(stamps) & (np.char.str_len(cells) >= len("YYYY-MM-DD HH:MM:SS"))
    return stamps.astype(np.int64), ok


def _parse_labels(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.char.strip(cells)
    return labels, np.char.str_len(labels) > 0


_ALLOWED = {
    "tokens": "an integer >= 1",
    "seconds": "a finite number of seconds",
    "timestamp": "a date and time, YYYY-MM-DD HH:MM:SS[.fffffff]",
    "label": "a non-empty class label",
}


def read_trace(path: str | os.PathLike, *, drop_bad: bool = False) -> Trace:
    """Read a trace file in the Azure or the generic schema (module docstring). Raises ``ValueError``
    naming the file, line and column of the first bad row, unless ``drop_bad`` drops and counts them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"{path}: cannot read trace: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    lines = text.split("\n")  # not splitlines(): line numbers as an editor counts them
    header_at = next((k for k, ln in enumerate(lines) if ln.strip()), None)
    if header_at is None:
        raise ValueError(f"{path}: empty file; a trace needs a header row and at least one request")
    schema, columns = _detect_schema(path, header_at + 1, lines[header_at].split(","))
    fast = _read_clean(text, header_at + 1, schema, columns)
    if fast is not None:
        return _trace(path, schema, *fast, dropped=0, reasons={})
    body = [ln.strip() for ln in lines[header_at + 1:]]
    keep = [k for k, ln in enumerate(body) if ln]
    if not keep:
        raise ValueError(f"{path}: header only, no requests (line {header_at + 1} is the header "
                         f"{lines[header_at].strip()!r})")
    line_no = np.array(keep, dtype=np.int64) + header_at + 2
    rows = [body[k] for k in keep] if len(keep) < len(body) else body  # one stripped line per request
    width = len(columns)
    bad: list[tuple[np.ndarray, str, str]] = []  # (mask, column, what was expected)
    shape_ok = np.fromiter((ln.count(",") for ln in rows), dtype=np.int64, count=len(rows)) == width - 1
    if not shape_ok.all():
        bad.append((~shape_ok, "", f"{width} comma-separated fields ({','.join(columns)})"))
    good = rows if shape_ok.all() else [ln for ln, ok in zip(rows, shape_ok) if ok]
    # one split of the joined lines: much faster than a split per line
    cells = np.array(",".join(good).split(",") if good else [], dtype=str).reshape(-1, width).T
    kinds = ("timestamp" if schema == "azure" else "seconds", "tokens", "tokens", "label")[:width]
    parsers = {"tokens": _parse_tokens, "seconds": _parse_seconds, "timestamp": _parse_timestamps,
               "label": _parse_labels}
    values, oks = [], []
    for col, kind, c in zip(columns, kinds, cells):
        v, ok = parsers[kind](c)
        full_ok = np.zeros(len(rows), dtype=bool)
        full_ok[shape_ok] = ok
        values.append(v)
        oks.append(ok)
        if not ok.all():
            bad.append((shape_ok & ~full_ok, col, _ALLOWED[kind]))
    parsed = np.logical_and.reduce(oks) if oks else np.zeros(0, bool)  # over the well-shaped rows
    # order: a row earlier than the latest parsed row before it (which is the latest kept row)
    t = values[0]
    order_ok = np.ones(len(t), dtype=bool)
    if parsed.any():
        tv = np.where(parsed, t, -np.inf if t.dtype.kind == "f" else np.iinfo(np.int64).min)  # rows left out
        prev_max = np.concatenate([[tv[0]], np.maximum.accumulate(tv)[:-1]])
        order_ok = ~(parsed & (tv < prev_max))
        if not order_ok.all():
            full = np.zeros(len(rows), dtype=bool)
            full[shape_ok] = ~order_ok
            bad.append((full, columns[0], "not earlier than the rows before it (rows in arrival order)"))
    if bad:
        if not drop_bad:
            raise _first_error(path, bad, rows, line_no, columns)
        keep_shaped = parsed & order_ok
        reasons = _count_reasons(bad, len(rows))
        dropped = int(len(rows) - keep_shaped.sum())
    else:
        keep_shaped = np.ones(len(t), dtype=bool)
        reasons, dropped = {}, 0
    if not keep_shaped.any():
        raise ValueError(f"{path}: no valid rows: all {len(rows)} requests were bad and dropped")
    labels = values[3][keep_shaped] if width == 4 else None
    return _trace(path, schema, values[0][keep_shaped], values[1][keep_shaped], values[2][keep_shaped], labels,
                  dropped=dropped, reasons=reasons)


def _trace(path, schema, t, prompt, output, labels, *, dropped, reasons) -> Trace:
    if schema == "azure":
        arrival = (t - t[0]).astype(np.float64) / 1e9  # int64 ns differences: exact before the division
        origin = str(np.datetime64(int(t[0]), "ns")).replace("T", " ")
    else:
        arrival = t - t[0]
        origin = repr(float(t[0]))
    return Trace(
        arrival_s=_readonly(np.ascontiguousarray(arrival, dtype=np.float64)),
        prompt_tokens=_readonly(np.ascontiguousarray(prompt, dtype=np.int64)),
        output_tokens=_readonly(np.ascontiguousarray(output, dtype=np.int64)),
        labels=None if labels is None else _readonly(np.ascontiguousarray(labels)),
        source=str(path), schema=schema, origin=origin, dropped=dropped, drop_reasons=reasons,
    )


_WIDE = 40  # characters of a time or label cell in the fast path; a longer cell takes the careful path


def _read_clean(text: str, skip: int, schema: str, columns) -> tuple | None:
    """The columns of a file with no bad row, parsed by NumPy's C reader (``np.loadtxt``); None at the
    first sign of trouble, and the careful row-by-row path then finds the bad rows and their lines."""
    dtype = [("t", f"U{_WIDE}" if schema == "azure" else "f8"), ("p", "i8"), ("d", "i8")]
    if len(columns) == 4:
        dtype.append(("c", f"U{_WIDE}"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = np.loadtxt(io.StringIO(text, newline=None), delimiter=",", dtype=dtype, comments=None,
                               skiprows=skip, ndmin=1, encoding=None)
    except (ValueError, OverflowError):
        return None
    if len(table) == 0 or (table["p"] < 1).any() or (table["d"] < 1).any():
        return None
    if schema == "azure":
        if (np.char.str_len(table["t"]) >= _WIDE - 1).any():
            return None
        t, ok = _parse_timestamps(table["t"])
    else:
        t, ok = _parse_seconds(table["t"])
    if not ok.all() or (np.diff(t) < 0).any():
        return None
    labels = None
    if len(columns) == 4:
        labels, ok = _parse_labels(table["c"])
        if not ok.all() or (np.char.str_len(table["c"]) >= _WIDE - 1).any():
            return None
    return t, table["p"], table["d"], labels


def _first_error(path, bad, rows, line_no, columns) -> ValueError:
    """The error of the first bad row (lowest line; within a row, the first failing column)."""
    firsts = [(int(np.argmax(mask)), k) for k, (mask, _, _) in enumerate(bad)]
    row, k = min(firsts)
    _, col, allowed = bad[k]
    where = f"{path}: line {line_no[row]}"
    fields = rows[row].split(",")
    if not col:
        return ValueError(f"{where}: expected {allowed}, got {len(fields)} field(s): {rows[row]!r}")
    got = fields[columns.index(col)].strip()
    if allowed.startswith("not earlier"):
        shaped = [r for r in range(row) if rows[r].count(",") == len(columns) - 1]
        prev = f" (line {line_no[shaped[-1]]} has {rows[shaped[-1]].split(',')[0].strip()!r})" if shaped else ""
        return ValueError(f"{where}, column '{col}': time {got!r} is earlier than the rows before it{prev}; "
                          "rows must be in arrival order (or pass drop_bad / --drop-bad)")
    return ValueError(f"{where}, column '{col}': must be {allowed}, got {got!r}")


def _count_reasons(bad, nrows: int) -> dict[str, int]:
    """Rows dropped per reason; a row is counted once, under its first failing check."""
    taken = np.zeros(nrows, dtype=bool)
    out = {}
    for mask, col, allowed in bad:
        new = mask & ~taken
        if new.any():
            key = "wrong number of fields" if not col else (
                f"{col} out of order" if allowed.startswith("not earlier") else f"bad {col}")
            out[key] = out.get(key, 0) + int(new.sum())
        taken |= mask
    return out
