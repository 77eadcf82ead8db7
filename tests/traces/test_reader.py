"""Reading traces: both schemas, every kind of bad row (file, line, column named), drop_bad counts, and
the real Azure trace against the figures its README states."""

from __future__ import annotations

import numpy as np
import pytest
from trace_helpers import write_generic

from jaxq.traces import read_trace, summarize

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
GENERIC_HEADER = "arrival_s,prompt_tokens,output_tokens"


def _write(tmp_path, text: str, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- good files ---------------------------------------------------------------------------------------


def test_azure_schema_exact_times(tmp_path):
    path = _write(tmp_path, "\n".join([
        AZURE_HEADER,
        "2023-11-16 18:15:46.6805900,374,44",
        "2023-11-16 18:15:46.6805901,396,109",  # 100 ns later
        "2023-11-16 23:59:59.9999999,10,1",
        "2023-11-17 00:00:00.0000000,11,2",  # across midnight
    ]) + "\n")
    tr = read_trace(path)
    assert tr.schema == "azure" and tr.num_requests == 4 and tr.dropped == 0
    assert tr.arrival_s.dtype == np.float64 and tr.prompt_tokens.dtype == np.int64
    assert tr.arrival_s[0] == 0.0
    assert tr.arrival_s[1] == 100e-9
    span_ns = (np.datetime64("2023-11-16T23:59:59.9999999", "ns") - np.datetime64("2023-11-16T18:15:46.6805900", "ns"))
    assert tr.arrival_s[2] == span_ns.astype(np.int64) / 1e9
    assert tr.arrival_s[3] - tr.arrival_s[2] == pytest.approx(1e-7, abs=1e-12)
    assert tr.prompt_tokens.tolist() == [374, 396, 10, 11] and tr.output_tokens.tolist() == [44, 109, 1, 2]
    assert tr.labels is None and tr.origin.startswith("2023-11-16 18:15:46.68059")


def test_azure_fixture_round_trip(three_class_file):
    """The synthetic Azure-schema file (CRLF, no final newline, as the real one) reads back its times to
    the 100 ns the format keeps, and its lengths exactly."""
    path, (t, p, d, _) = three_class_file
    tr = read_trace(path)
    assert tr.num_requests == len(t)
    assert np.max(np.abs(tr.arrival_s - (t - t[0]))) < 2e-7
    assert np.array_equal(tr.prompt_tokens, p) and np.array_equal(tr.output_tokens, d)


def test_generic_schema_with_labels_bom_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes(("\ufeff Arrival_S , prompt_tokens,output_tokens, class \r\n"
                      "100.5,10,20,chat\r\n\r\n"
                      "100.5, 11 ,21, code \r\n"
                      "102.25,12,22,chat\r\n").encode("utf-8"))
    tr = read_trace(path)
    assert tr.schema == "generic"
    assert tr.arrival_s.tolist() == [0.0, 0.0, 1.75]
    assert tr.prompt_tokens.tolist() == [10, 11, 12] and tr.output_tokens.tolist() == [20, 21, 22]
    assert tr.labels.tolist() == ["chat", "code", "chat"]
    assert tr.origin == "100.5"


def test_generic_without_labels_and_careful_path_agree(tmp_path):
    """A clean file takes NumPy's C reader; one with a bad row the careful path: with the bad row
    dropped, both give the same trace."""
    rng = np.random.default_rng(3)
    t = np.cumsum(rng.exponential(0.2, 300))
    p, d = rng.integers(1, 5000, 300), rng.integers(1, 900, 300)
    clean = read_trace(write_generic(tmp_path / "clean.csv", t, p, d))
    text = (tmp_path / "clean.csv").read_text().splitlines()
    text.insert(150, "oops,1,2")
    dirty = read_trace(_write(tmp_path, "\n".join(text), "dirty.csv"), drop_bad=True)
    assert dirty.dropped == 1 and dirty.drop_reasons == {"bad arrival_s": 1}
    for field in ("arrival_s", "prompt_tokens", "output_tokens"):
        assert np.array_equal(getattr(clean, field), getattr(dirty, field))
    assert clean.labels is None


def test_long_label_takes_the_careful_path(tmp_path):
    label = "x" * 100
    tr = read_trace(_write(tmp_path, f"{GENERIC_HEADER},class\n0,1,2,{label}\n1,3,4,b\n"))
    assert tr.labels.tolist() == [label, "b"]


# -- bad files and bad rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("", "empty file"),
    ("\n\n  \n", "empty file"),
    (AZURE_HEADER + "\n", "header only"),
    (GENERIC_HEADER + "\n\n", "header only"),
    ("time,prompt,output\n1,2,3\n", "line 1: unknown header"),
    ("arrival_s,prompt_tokens\n1,2\n", "unknown header"),
])
def test_unreadable_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_trace(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read trace"):
        read_trace(tmp_path / "nope.csv")


AZ_OK = "2023-11-16 18:15:46.6805900,374,44"
AZ_LATER = "2023-11-16 18:15:48.0000000,300,40"


@pytest.mark.parametrize("header, bad, column", [
    (AZURE_HEADER, "yesterday,3,4", "TIMESTAMP"),
    (AZURE_HEADER, "2023-11-16,3,4", "TIMESTAMP"),  # a date without a time of day
    (AZURE_HEADER, "2023-11-16 25:00:00.0,3,4", "TIMESTAMP"),
    (AZURE_HEADER, "NaT,3,4", "TIMESTAMP"),
    (AZURE_HEADER, ",3,4", "TIMESTAMP"),
    (AZURE_HEADER, "2023-11-16 18:15:49.0,0,4", "ContextTokens"),
    (AZURE_HEADER, "2023-11-16 18:15:49.0,-3,4", "ContextTokens"),
    (AZURE_HEADER, "2023-11-16 18:15:49.0,1.5,4", "ContextTokens"),
    (AZURE_HEADER, "2023-11-16 18:15:49.0,12,x", "GeneratedTokens"),
    (AZURE_HEADER, "2023-11-16 18:15:49.0,12,99999999999999999999", "GeneratedTokens"),
    (AZURE_HEADER, "2023-11-16 18:15:40.0,12,3", "TIMESTAMP"),  # out of order
    (AZURE_HEADER, "2023-11-16 18:15:49.0,12", None),  # too few fields
    (AZURE_HEADER, "2023-11-16 18:15:49.0,12,3,4", None),  # too many
    (GENERIC_HEADER, "abc,3,4", "arrival_s"),
    (GENERIC_HEADER, "nan,3,4", "arrival_s"),
    (GENERIC_HEADER, "inf,3,4", "arrival_s"),
    (GENERIC_HEADER, "10,3.0,4", "prompt_tokens"),
    (GENERIC_HEADER, "10,3,0", "output_tokens"),
    (GENERIC_HEADER, "0.5,3,4", "arrival_s"),  # out of order
    (GENERIC_HEADER, "10,3", None),
    (GENERIC_HEADER + ",class", "10,3,4,", "class"),  # empty label
    (GENERIC_HEADER + ",class", "10,3,4", None),
])
def test_bad_row_names_file_line_and_column(tmp_path, header, bad, column):
    ok, later = (AZ_OK, AZ_LATER) if header == AZURE_HEADER else ("1.0,374,44", "2.0,300,40")
    if header.endswith("class"):
        ok, later = ok + ",a", later + ",b"
    path = _write(tmp_path, "\n".join([header, ok, later, bad, later.replace("18:15:48", "18:15:59")
                                       .replace("2.0,", "20.0,")]) + "\n")
    with pytest.raises(ValueError) as err:
        read_trace(path)
    msg = str(err.value)
    assert str(path) in msg and "line 4" in msg, msg
    if column is None:
        assert "comma-separated fields" in msg, msg
    else:
        assert f"column '{column}'" in msg, msg
    tr = read_trace(path, drop_bad=True)
    assert tr.dropped == 1 and tr.num_requests == 3 and sum(tr.drop_reasons.values()) == 1


def test_out_of_order_names_the_earlier_line(tmp_path):
    path = _write(tmp_path, f"{GENERIC_HEADER}\n1,2,3\n5,2,3\n4,2,3\n")
    with pytest.raises(ValueError, match=r"line 4, column 'arrival_s': time '4' is earlier .*line 3 has '5'"):
        read_trace(path)


def test_drop_bad_counts_by_reason(tmp_path):
    rows = [GENERIC_HEADER, "0,10,10", "1,x,10", "2,10,10", "3,10", "1.5,10,10", "4,10,0", "5,10,10", "6,-1,y"]
    tr = read_trace(_write(tmp_path, "\n".join(rows)), drop_bad=True)
    assert tr.arrival_s.tolist() == [0.0, 2.0, 5.0]
    assert tr.dropped == 5
    assert tr.drop_reasons == {"wrong number of fields": 1, "bad prompt_tokens": 2, "bad output_tokens": 1,
                               "arrival_s out of order": 1}


def test_drop_bad_with_nothing_left(tmp_path):
    with pytest.raises(ValueError, match="no valid rows"):
        read_trace(_write(tmp_path, f"{GENERIC_HEADER}\nx,1,1\n1,0,1\n"), drop_bad=True)


def test_azure_fixture_with_bad_rows(three_class_file):
    path, (t, *_) = three_class_file
    lines = path.read_text().split("\n")
    lines[10] = lines[10].replace(",", ";", 1)  # line 11: two fields
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"line 11: expected 3 comma-separated fields"):
        read_trace(path)
    assert read_trace(path, drop_bad=True).num_requests == len(t) - 1


# -- the real trace ---------------------------------------------------------------------------------------


def test_real_azure_trace_matches_its_readme(azure_path):
    """Figures from ../shared/data/azure-llm-2023/README.md (written there, not computed here)."""
    tr = read_trace(azure_path)
    rows = sum(1 for line in azure_path.read_text().split("\n") if line.strip()) - 1  # an independent count
    assert tr.num_requests == rows
    assert abs(tr.num_requests - 19_365) <= 1  # README: "about 19,365 requests"
    assert tr.duration_s == pytest.approx(3502, abs=1.0)  # "over 3,502 s"
    s = summarize(tr)
    assert s.mean_rate == pytest.approx(5.5, abs=0.05)
    assert s.per_5min.rates.max() == pytest.approx(7.5, abs=0.05)  # "from 3.9 to 7.5 requests/s in 5-minute bins"
    assert s.gap_cv == pytest.approx(1.09, abs=0.005)
    assert s.prompt.mean == pytest.approx(1155, abs=0.5) and s.prompt.median == 1020
    assert s.prompt.p99 == pytest.approx(4142, abs=0.5) and s.prompt.cv == pytest.approx(0.96, abs=0.005)
    assert s.output.mean == pytest.approx(211, abs=0.5) and s.output.median == 129
    assert s.output.p99 == pytest.approx(601, abs=0.5) and s.output.cv == pytest.approx(0.77, abs=0.005)
    assert s.log_corr == pytest.approx(0.09, abs=0.005)
