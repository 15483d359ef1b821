"""journald priorities on the daemon's JSON log lines (service/logs.py)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re

import pytest

from service.logs import QUIET_LOGGERS, JsonFormatter, setup_logging, stream_is_journal, syslog_priority

LEVELS = [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7)]


def _record(level: int, msg: str = "m", **extra) -> logging.LogRecord:
    rec = logging.LogRecord("service.test", level, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize("level,prio", LEVELS)
def test_each_level_gets_its_syslog_priority_and_the_rest_is_the_json(level, prio):
    line = JsonFormatter(syslog_prefix=True).format(_record(level, "disk\nfull", job_id=7))
    m = re.fullmatch(r"<(\d)>(\{.*\})", line)
    assert m, line
    assert int(m.group(1)) == prio
    obj = json.loads(m.group(2))
    assert obj["level"] == logging.getLevelName(level) and obj["msg"] == "disk\nfull" and obj["job_id"] == 7


def test_levels_between_the_named_ones_round_down_and_plain_lines_have_no_prefix():
    assert [syslog_priority(n) for n in (5, 15, 25, 35, 45, 60)] == [7, 7, 6, 4, 3, 2]
    line = JsonFormatter().format(_record(logging.ERROR))
    assert line.startswith("{") and json.loads(line)["level"] == "ERROR"


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


@contextlib.contextmanager
def installed(log_file, **kw):
    """setup_logging(log_file, **kw) for the block: handlers flushed at its end, then the root
    logger and the quietened loggers put back as they were."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    handlers = setup_logging(log_file, **kw)
    try:
        yield handlers
        for h in handlers:
            h.flush()
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def test_forced_prefix_goes_to_the_stream_only_never_the_file(tmp_path):
    stream = io.StringIO()
    with installed(tmp_path / "logs" / "edgekif.log", stream=stream, syslog_prefix=True):
        log = logging.getLogger("service.test")
        log.error("boom", extra={"job_id": 3})
        log.warning("careful")
        log.info("fine")
    out = _lines(stream.getvalue())
    assert [line[:3] for line in out] == ["<3>", "<4>", "<6>"]
    assert [json.loads(line[3:])["msg"] for line in out] == ["boom", "careful", "fine"]
    file_lines = _lines((tmp_path / "logs" / "edgekif.log").read_text())
    assert [json.loads(line)["msg"] for line in file_lines] == ["boom", "careful", "fine"]  # plain JSON: parses as is


def test_prefix_is_automatic_only_when_stdout_is_the_journal_stream(tmp_path, monkeypatch):
    f = open(tmp_path / "stdout", "w")  # stands in for the journal socket: any fd with a dev:inode
    other = open(tmp_path / "other", "w")
    try:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stream_is_journal(f)
        assert not stream_is_journal(other)  # variable inherited, but this stdout is not the journal
        assert not stream_is_journal(io.StringIO())
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        try:
            auto = setup_logging(None, stream=f)
            assert auto[0].formatter.syslog_prefix is True
            plain = setup_logging(None, stream=other)
            assert plain[0].formatter.syslog_prefix is False
        finally:
            for h in plain:
                root.removeHandler(h)
            root.handlers[:], root.level = saved[0], saved[1]
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not stream_is_journal(f)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stream_is_journal(f)
    finally:
        f.close()
        other.close()


def test_bitsandbytes_offline_kernel_warning_stays_out_of_the_daemon_log_but_its_errors_do_not():
    stream = io.StringIO()
    with installed(None, stream=stream, syslog_prefix=False):
        bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
        bnb.error("a real bitsandbytes error")
        logging.getLogger("service.test").warning("the daemon's own warning")
    assert [json.loads(line)["msg"] for line in _lines(stream.getvalue())] == ["a real bitsandbytes error", "the daemon's own warning"]


def test_a_nan_figure_is_written_as_null_so_strict_parsers_read_the_line():
    import json
    import logging

    from edgekif.jsontext import dumps
    from service.logs import JsonFormatter

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "general ability measured", None, None)
    record.loglik_drop, record.scores = float("nan"), [0.5, float("inf")]
    line = strict(JsonFormatter().format(record))
    assert line["loglik_drop"] is None and line["scores"] == [0.5, None]
    assert strict(dumps({"loss": float("nan"), "steps": (1, 2)})) == {"loss": None, "steps": [1, 2]}
