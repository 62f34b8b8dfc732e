"""`--json` tables: the column-wise conversion equals pandas' own records, value for value."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from moescope.results import AnalysisResult, to_jsonable


def _reference(frame: pd.DataFrame) -> list[dict]:
    return [to_jsonable(row) for row in frame.to_dict(orient="records")]


def test_records_equal_pandas_records_for_every_column_kind():
    rng = np.random.default_rng(0)
    n = 50
    floats = rng.normal(size=n)
    floats[[3, 7]] = np.nan
    floats[9] = np.inf
    frame = pd.DataFrame({
        "image": [f"id/{i:03d}.png" for i in range(n)],
        "expert": np.arange(n) % 3,
        "small": rng.integers(0, 5, n).astype(np.int8),
        "mass": floats,
        "single": floats.astype(np.float32),
        "flag": rng.random(n) > 0.5,
        "maybe": [None if i % 5 == 0 else float(i) for i in range(n)],
        "path": [Path(f"/x/{i}") for i in range(n)],
        "case": pd.Categorical(["success", "failure"] * (n // 2)),
        "share": pd.array([None if i == 6 else i / 2 for i in range(n)], dtype="Float64"),
        "count": pd.array([None if i == 4 else i for i in range(n)], dtype="Int64"),
    })
    frame.columns = [*frame.columns[:-1], 7]  # a non-string label
    mine = to_jsonable(frame)
    reference = _reference(frame)
    assert mine == reference
    assert [type(v) for v in mine[1].values()] == [type(v) for v in reference[1].values()]
    assert to_jsonable(frame.iloc[:0]) == [] and to_jsonable(frame[[]]) == _reference(frame[[]])


def test_result_json_round_trips_a_per_image_table():
    frame = pd.DataFrame({"image": ["a", "b"], "entropy": [0.5, np.nan], "expert": [0, 1]})
    result = AnalysisResult(command="x", checkpoints=[], settings={}, tables={"t": frame}, summary={})
    assert json.loads(result.to_json())["tables"]["t"] == [{"image": "a", "entropy": 0.5, "expert": 0},
                                                          {"image": "b", "entropy": None, "expert": 1}]


def test_compact_json_is_json_dumps_of_the_dict():
    """`--json` (compact) writes table rows one by one; the text is exactly json.dumps of the dict."""
    tables = {
        "empty": pd.DataFrame(columns=["a", "b"]),
        "mixed": pd.DataFrame({"image": ["a/1.png", 'q"uote'], "x": [0.25, np.nan], "n": [1, 2], "ok": [True, False]}),
        "no columns": pd.DataFrame(index=range(3)),
    }
    result = AnalysisResult(command="maps", checkpoints=[Path("/c.pt")], settings={"labels": ["after"], "eps": np.float64(0.5)},
                            tables=tables, summary={"images": np.int64(2), "nan": float("nan")}, warnings=["w"])
    text = result.to_json(indent=None)
    assert text == json.dumps(result.to_json_dict(), allow_nan=False)
    assert json.loads(text)["tables"]["mixed"][1] == {"image": 'q"uote', "x": None, "n": 2, "ok": False}
    assert json.loads(result.to_json()) == json.loads(text)  # the indented file holds the same
    empty = AnalysisResult(command="x", checkpoints=[], settings={}, tables={}, summary={})
    assert empty.to_json(indent=None) == json.dumps(empty.to_json_dict())


def test_json_is_written_row_by_row():
    """`--json` output streams: the text comes in pieces no larger than a row (plus the header),
    never as one string of the whole table."""
    frame = pd.DataFrame({"image": [f"{i:06d}.png" for i in range(2000)], "x": np.linspace(0, 1, 2000)})
    result = AnalysisResult(command="maps", checkpoints=[], settings={}, tables={"t": frame}, summary={})
    pieces = []

    class Recorder:
        def write(self, text):
            pieces.append(text)

    result.write_json(Recorder())
    assert "".join(pieces) == json.dumps(result.to_json_dict(), allow_nan=False)
    assert len(pieces) > 2000 and max(map(len, pieces)) < 200
