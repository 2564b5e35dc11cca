"""Dataset readers and the CLI's error handling (no broker needed)."""

from __future__ import annotations

import orjson
import pytest

from clickpulse.cli import main
from clickpulse.errors import DatasetError
from clickpulse.ingest.replay import messages


def test_jsonl_messages_keep_bytes_and_key_by_user(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_bytes(b'{"type":"page_view","user_id":"u1","timestamp":1569888000000}\n\nnot json\n'
                  b'{"type":"page_view","anonymousId":"a1","timestamp":"2019-10-01T00:00:02Z"}\n')
    out = list(messages("jsonl", f))
    assert [k for k, _v, _t in out] == [b"u1", None, b"anon:a1"]
    assert out[1][1] == b"not json"            # published as-is; ingest dead-letters it
    assert [t for _k, _v, t in out] == [1569888000000, None, 1569888002000]


def test_rees46_messages_are_keyed_by_user_and_carry_event_time():
    key, value, ts = next(iter(messages("rees46", "src/clickpulse/data/rees46-2019-oct-sample.csv")))
    ev = orjson.loads(value)
    assert key == b"541312140" and ts == ev["timestamp"] == 1569888000000


def test_bad_dataset_files(tmp_path):
    with pytest.raises(DatasetError):
        list(messages("rees46", tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DatasetError, match="REES46 header"):
        list(messages("rees46", bad))
    with pytest.raises(DatasetError, match="unknown format"):
        list(messages("parquet", bad))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["replay", "--format", "rees46", str(tmp_path / "nope.csv")]) == 2
    assert "clickpulse: error: no such file" in capsys.readouterr().err


def test_report_paths_cli(capsys):
    assert main(["report", "paths", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "product_view > add_to_cart" in out and "conversion" in out


def test_rules_check_lists_a_valid_file_and_rejects_a_bad_one(tmp_path, capsys):
    assert main(["rules", "check"]) == 0  # the packaged default rules
    out = capsys.readouterr().out
    assert "valid, version 2026-12-01.1+" in out
    assert "trigger cart_abandonment         on timeout after add_to_cart, no purchase within 1800 s -> " \
           "cart_abandoned (once per episode, needs marketing consent)" in out
    bad = tmp_path / "rules.yaml"
    bad.write_text('version: "x"\ntriggers:\n  - name: a\n    on: add_to_cart\n    when: "cart.value > 5"\n'
                   '    action: {type: t}\n')
    assert main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "trigger 'a', field 'when' (file line 5), expression line 1, column 12" in err and "50.0" in err
