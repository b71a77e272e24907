import math
from pathlib import Path

import pytest

from bench.load import traces
from bench.load.traces import RateShape, TraceError, TraceRequest

AZURE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "azure_llm_2023_conv.csv"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_csv_converts_with_relative_millisecond_timestamps(tmp_path):
    path = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    rows, report = traces.from_azure_csv(path)
    assert report.rows == 2 and report.skipped == 0
    assert rows[0] == TraceRequest(0.0, 374, 44)
    assert rows[1].timestamp_ms == pytest.approx(4314.579, abs=0.01)


def test_bad_rows_fail_with_the_line_number_or_are_skipped_and_counted(tmp_path):
    path = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.00,-3,10\nnot-a-date,5,5\n")
    with pytest.raises(TraceError, match=r"a.csv:3: ContextTokens \(-3\)"):
        traces.from_azure_csv(path)
    rows, report = traces.from_azure_csv(path, skip_bad=True)
    assert len(rows) == 1 and report.skipped == 2 and "a.csv:4" in report.first_errors[1]
    with pytest.raises(TraceError, match="missing columns"):
        traces.from_azure_csv(write(tmp_path, "b.csv", "time,in,out\n1,2,3\n"))


def test_burstgpt_csv(tmp_path):
    path = write(tmp_path, "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5.0,ChatGPT,472,18,490,Conversation log\n7.5,GPT-4,1000,0,1000,API log\n6,ChatGPT,10,2,12,x\n")
    with pytest.raises(TraceError, match=r"b.csv:3: Response tokens \(0\) must be >= 1"):
        traces.from_burstgpt_csv(path)
    rows, report = traces.from_burstgpt_csv(path, skip_bad=True)
    assert [(r.timestamp_ms, r.input_length) for r in rows] == [(0.0, 472), (1000.0, 10)]


@pytest.mark.skipif(not AZURE.exists(), reason="shared/traces not beside this checkout")
def test_the_shipped_azure_trace():
    rows, report = traces.from_azure_csv(AZURE)
    summary = traces.summarize_trace(rows)
    assert report.skipped == 0 and summary["requests"] == 19_366
    assert (summary["median_input"], summary["median_output"]) == (1020, 129)


def test_jsonl_round_trip_and_errors(tmp_path):
    rows = [TraceRequest(0.0, 10, 5, (1, 2, 3)), TraceRequest(12.5, 20, 6)]
    path = tmp_path / "t.jsonl"
    assert traces.write_jsonl(rows, path) == 2
    assert traces.read_jsonl(path) == rows
    path.write_text('{"timestamp": 0, "input_length": 3}\n')
    with pytest.raises(TraceError, match=r"t.jsonl:1: missing field 'output_length'"):
        traces.read_jsonl(path)


BAD_ROWS = ['null', '[]', '1', '"x"', '{', '{"timestamp": null, "input_length": 1, "output_length": 1}',
            '{"timestamp": "a", "input_length": 1, "output_length": 1}', '{"timestamp": 1e309, "input_length": 1, '
            '"output_length": 1}', '{"timestamp": NaN, "input_length": 1, "output_length": 1}',
            '{"timestamp": -5, "input_length": 1, "output_length": 1}', '{"timestamp": 0, "input_length": -1, '
            '"output_length": 1}', '{"timestamp": 0, "input_length": 1.5, "output_length": 1}',
            '{"timestamp": 0, "input_length": true, "output_length": 1}', '{"timestamp": 0, "input_length": '
            '100000000000000000000, "output_length": 1}', '{"timestamp": 0, "input_length": 1, "output_length": 1, '
            '"hash_ids": "x"}']


@pytest.mark.parametrize("row", BAD_ROWS)
def test_a_bad_trace_row_is_one_error_naming_the_line(tmp_path, row):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1}\n' + row + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: "):
        traces.read_jsonl(path)


def test_a_trace_that_is_not_text_is_one_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not UTF-8"):
        traces.read_jsonl(path)


def test_time_scale_rate_scale_truncate_window():
    rows = [TraceRequest(i * 100.0, 100 + i, 10) for i in range(1000)]
    assert traces.time_scale(rows, 0.5)[-1].timestamp_ms == pytest.approx(49_950)
    half = traces.rate_scale(rows, 0.5, seed=1)
    double = traces.rate_scale(rows, 2.0, seed=1)
    assert 400 < len(half) < 600 and len(double) == 2000
    assert double[-1].timestamp_ms <= rows[-1].timestamp_ms and traces.rate_scale(rows, 0.5, seed=1) == half
    cut = traces.truncate(rows, max_input=500, max_output=8)
    assert max(r.input_length for r in cut) == 500 and {r.output_length for r in cut} == {8}
    win = traces.window(rows, start_s=10, duration_s=5)
    assert len(win) == 50 and win[0].timestamp_ms == 0.0
    with pytest.raises(ValueError, match=r"time scale factor \(0\)"):
        traces.time_scale(rows, 0)


def test_synthetic_diurnal_trace_follows_its_shape_and_is_seeded():
    sizes = [TraceRequest(0, 100, 10), TraceRequest(0, 2000, 50)]
    shape = RateShape(mean_rps=5, peak_to_trough=3, day_s=1000, peak_hour=6)  # peak at t=250 s
    rows = traces.synthesize(shape, 1000, sizes, seed=4)
    assert rows == traces.synthesize(shape, 1000, sizes, seed=4)
    assert len(rows) == pytest.approx(5000, rel=0.08)
    peak = sum(1 for r in rows if 125_000 <= r.timestamp_ms < 375_000)
    trough = sum(1 for r in rows if 625_000 <= r.timestamp_ms < 875_000)
    assert 2.0 < peak / trough < 4.0  # a 3:1 day, sampled over quarter-day windows
    assert {(r.input_length, r.output_length) for r in rows} <= {(100, 10), (2000, 50)}
    spiky = RateShape(mean_rps=5, peak_to_trough=1, spikes=((100.0, 10.0, 4.0),))
    rows = traces.synthesize(spiky, 200, sizes, seed=1)
    in_spike = sum(1 for r in rows if 100_000 <= r.timestamp_ms < 110_000)
    assert in_spike == pytest.approx(200, rel=0.3)
    with pytest.raises(ValueError, match=r"peak_to_trough \(0.5\)"):
        RateShape(mean_rps=1, peak_to_trough=0.5)
    assert math.isclose(RateShape(mean_rps=2, steps=((10, 3.0),), peak_to_trough=1).rate(11), 6.0)
