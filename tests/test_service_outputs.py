"""JSON logs (service/logs.py) and the Prometheus textfile (service/metrics.py)."""

from __future__ import annotations

import io
import json
import logging

from service.jobs import JobStore
from service.logs import JsonFormatter, setup_logging
from service.metrics import MetricsWriter, render, version_number


def test_json_formatter_one_object_per_line_with_extra_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("edgekif.test.json")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("file %s taken", "a.jsonl", extra={"job_id": 7, "file": "a.jsonl"})
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the traceback's newlines stay inside the JSON string
    first, second = map(json.loads, lines)
    assert first["level"] == "WARNING" and first["logger"] == "edgekif.test.json"
    assert first["msg"] == "file a.jsonl taken" and first["job_id"] == 7 and first["file"] == "a.jsonl"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "ValueError: bad" in second["exc"] and second["level"] == "ERROR"


def test_setup_logging_writes_rotating_file_and_replaces_its_handlers(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        setup_logging(tmp_path / "logs" / "edgekif.log", max_bytes=300, backups=2, stream=io.StringIO())
        handlers = setup_logging(tmp_path / "logs" / "edgekif.log", max_bytes=300, backups=2, stream=io.StringIO())
        assert sum(h in root.handlers for h in handlers) == 2
        assert len(root.handlers) == len(before) + 2  # the first call's handlers were removed
        for i in range(20):
            logging.getLogger("service.test").info("line %d", i, extra={"i": i})
        files = sorted(p.name for p in (tmp_path / "logs").iterdir())
        assert files == ["edgekif.log", "edgekif.log.1", "edgekif.log.2"]
        last = json.loads((tmp_path / "logs" / "edgekif.log").read_text().splitlines()[-1])
        assert last["i"] == 19
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)


def _metrics(text: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_counted_from_events_and_written_atomically_on_change(tmp_path):
    with JobStore(tmp_path / "state.db") as store:
        fid = store.begin_take("a.jsonl", "a" * 64, 1, "t", "/a")
        job = store.finish_take(fid)
        store.log_event(None, "inbox_rejected", file="link")
        for a, b in (("received", "validated"), ("validated", "buffered"), ("buffered", "trained")):
            store.advance(job, a, b)
        store.log_event(job, "train_run", seconds=1.5, outcome="interrupted")
        store.log_event(job, "train_run", seconds=2.25, outcome="done")
        m = _metrics(render(store))
        assert m["edgekif_files_received_total"] == 2
        assert m["edgekif_files_rejected_total"] == 1
        assert m["edgekif_training_seconds_total"] == 3.75
        assert m["edgekif_queue_length"] == 1 and m["edgekif_current_version"] == 0
        for a, b in (("trained", "exported"), ("exported", "evaluated"), ("evaluated", "approved")):
            store.advance(job, a, b)
        store.advance(job, "approved", "published", version="v0012")
        (tmp_path / "models" / "v0012").mkdir(parents=True)  # what the publish stage leaves: the live link
        (tmp_path / "models" / "current").symlink_to("v0012")

        writer = MetricsWriter(tmp_path / "metrics.prom")
        assert writer.write(store) is True
        assert writer.write(store) is False  # unchanged: not rewritten
        m = _metrics((tmp_path / "metrics.prom").read_text())
        assert m["edgekif_jobs_published_total"] == 1 and m["edgekif_current_version"] == 12
        assert m["edgekif_queue_length"] == 0 and m["edgekif_jobs_failed_total"] == 0
        assert "# TYPE edgekif_jobs_published_total counter" in (tmp_path / "metrics.prom").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_version_number():
    assert version_number("v3") == 3 and version_number("2025-01-01-v7") == 7
    assert version_number(None) is None and version_number("latest") is None


def test_counters_keep_their_precision_and_a_version_no_job_made_counts(tmp_path):
    from edgekif.publish import ModelStore
    from service.fake_stages import _build_export

    with JobStore(tmp_path / "state.db") as store:
        store.log_event(None, "train_run", seconds=1_000_000.5, outcome="done")
        store.log_event(None, "train_run", seconds=4.5, outcome="done")
        _build_export(tmp_path / "by-hand", {"model.json": "{}"}, accuracies={})
        ModelStore(tmp_path).publish(tmp_path / "by-hand")  # `edgekif export --publish`: no job
        m = _metrics(render(store))
    assert m["edgekif_training_seconds_total"] == 1_000_005.0  # `:g` wrote 1e+06 for both
    assert m["edgekif_current_version"] == 1
