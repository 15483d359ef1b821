"""edgekif.tasks: the kind decided from the data, the sidecar that overrides it, the answer budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from edgekif.errors import TaskSpecError, ValidationError
from edgekif.records import Record
from edgekif.tasks import (
    AnswerBudgetConfig,
    KindDetectionConfig,
    TaskSpec,
    answer_budget,
    detect_kind,
    read_sidecar,
    read_task_spec,
    sidecar_path,
)
from edgekif.taskfile import read_task

SHARED_DATA = REPO.parent / "shared" / "data"


def recs(*outputs: str) -> list[Record]:
    return [Record.from_prompt(f"q{i}", o, id=str(i)) for i, o in enumerate(outputs)]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "folder, kind",
    [("cl-benchmark", "classification"), ("gen-benchmark", "generation")],
)
def test_the_shared_benchmarks_are_detected_as_what_they_are(folder, kind):
    files = sorted((SHARED_DATA / folder).glob("*/train.jsonl"))
    if not files:
        pytest.skip(f"benchmark data not found in {SHARED_DATA / folder}")
    detected = {f.parent.name: detect_kind(read_task(f).records) for f in files}
    assert detected == {name: kind for name in detected}


@pytest.mark.parametrize("task", ["agnews", "dbpedia"])
def test_the_demo_files_are_classification(task):
    assert detect_kind(read_task(REPO / "tools" / "demo_data" / task / "train.jsonl").records) == "classification"


def test_labels_are_compared_normalised():
    # "Yes", "yes." and "YES" are one label: 2 labels over 6 records
    assert detect_kind(recs("Yes", "yes.", "YES", "No", "no", "No!")) == "classification"


def test_the_rule_at_its_edges():
    # 10 records allow max(2, min(50, 2)) = 2 labels
    assert detect_kind(recs(*"aabbaabbab")) == "classification"
    assert detect_kind(recs(*"aabbccaabb")) == "generation"  # 3 labels > 2
    # 40 records allow 8 labels, each seen 5 times
    assert detect_kind(recs(*[f"label {i % 8}" for i in range(40)])) == "classification"
    assert detect_kind(recs(*[f"label {i % 9}" for i in range(45)])) == "classification"  # 9 <= floor(0.2 * 45)
    assert detect_kind(recs(*[f"label {i % 10}" for i in range(45)])) == "generation"
    # 1000 records: at most 50 labels, however many repeats
    assert detect_kind(recs(*[f"l{i % 50}" for i in range(1000)])) == "classification"
    assert detect_kind(recs(*[f"l{i % 51}" for i in range(1000)])) == "generation"


def test_a_label_seen_once_makes_it_generation():
    outputs = ["pos", "neg"] * 20 + ["neutral"]
    assert detect_kind(recs(*outputs)) == "generation"
    assert detect_kind(recs(*outputs), KindDetectionConfig(min_label_count=1)) == "classification"


def test_free_text_and_nothing_are_generation():
    assert detect_kind(recs(*[f"a headline about thing {i}" for i in range(30)])) == "generation"
    assert detect_kind([]) == "generation"


# --------------------------------------------------------------------------- answer budget


@pytest.fixture(scope="module")
def tok():
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()  # byte-level: one token per ASCII character


def test_the_tiny_tokenizer_counts_characters(tok):
    assert len(tok("World", add_special_tokens=False)["input_ids"]) == 5


def test_classification_budget_fits_the_longest_label(tok):
    records = recs("World", "Sports", "Business", "World")  # longest: 8 tokens
    assert answer_budget(tok, records, "classification") == 8 + 2
    assert answer_budget(tok, recs("A", "B", "A"), "classification") == 4  # never below min_new_tokens
    long_labels = recs("Educational Institution", "Mean of Transportation")  # 23 tokens
    assert answer_budget(tok, long_labels, "classification") == 16  # capped small


def test_generation_budget_is_a_percentile_plus_a_margin(tok):
    # lengths 1..100: numpy's 95th percentile (linear) = 95.05 -> 96, + 4 margin = 100
    records = recs(*["x" * n for n in range(1, 101)])
    assert answer_budget(tok, records, "generation") == 100
    assert answer_budget(tok, records, "generation", AnswerBudgetConfig(percentile=50, margin_tokens=0)) == 51  # 50.5 -> 51
    assert answer_budget(tok, recs("x" * 500, "y" * 400), "generation") == 128  # capped
    assert answer_budget(tok, records, "generation", AnswerBudgetConfig(max_new_tokens=64)) == 64


def test_one_long_answer_does_not_set_the_budget(tok):
    records = recs(*(["ten chars!"] * 99 + ["x" * 120]))
    assert answer_budget(tok, records, "generation") == 10 + 4


def test_budget_of_an_unknown_kind(tok):
    with pytest.raises(ValueError, match="unknown task kind"):
        answer_budget(tok, recs("a"), "ranking")


# --------------------------------------------------------------------------- sidecar


def write_task(folder: Path, name: str, outputs, sidecar: str | None = None) -> tuple[Path, list[Record]]:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": o}) + "\n" for i, o in enumerate(outputs)))
    if sidecar is not None:
        (folder / f"{name}.task.toml").write_text(sidecar)
    return path, read_task(path).records


LABELS = ["World", "Sports"] * 10
HEADLINES = [f"Headline number {i} about something" for i in range(20)]


def test_sidecar_path():
    assert sidecar_path("/inbox/news.jsonl") == Path("/inbox/news.task.toml")
    assert sidecar_path("in/a.b.csv") == Path("in/a.b.task.toml")


def test_without_a_sidecar_everything_is_detected(tmp_path, tok):
    path, records = write_task(tmp_path, "labels", LABELS)
    assert read_task_spec(path, records, tok) == TaskSpec("classification", "normalized_exact_match", 6 + 2, "detected", ())
    path, records = write_task(tmp_path, "news", HEADLINES)
    spec = read_task_spec(path, records)  # no tokenizer: the budget is left open
    assert (spec.kind, spec.metric, spec.max_new_tokens, spec.source) == ("generation", "rouge_l", None, "detected")


def test_the_sidecar_overrides_the_kind_and_its_metric_follows(tmp_path, tok):
    path, records = write_task(tmp_path, "labels", LABELS, 'kind = "generation"\n')
    spec = read_task_spec(path, records, tok)
    assert spec == TaskSpec("generation", "rouge_l", spec.max_new_tokens, "sidecar", ("kind",))
    assert spec.max_new_tokens == 6 + 4  # the generation budget of these answers


def test_the_sidecar_states_all_three(tmp_path, tok):
    sidecar = '# headlines, judged as free text\nkind = "generation"\nmetric = "chrf"\nmax_new_tokens = 48\n'
    path, records = write_task(tmp_path, "news", HEADLINES, sidecar)
    spec = read_task_spec(path, records, tok)
    assert spec == TaskSpec("generation", "chrf", 48, "sidecar", ("kind", "metric", "max_new_tokens"))
    assert spec.to_dict() == {"kind": "generation", "metric": "chrf", "max_new_tokens": 48, "source": "sidecar", "stated": ["kind", "metric", "max_new_tokens"]}


def test_a_sidecar_without_the_kind_leaves_it_detected(tmp_path, tok):
    path, records = write_task(tmp_path, "labels", LABELS, "max_new_tokens = 3\n")
    assert read_task_spec(path, records, tok) == TaskSpec("classification", "normalized_exact_match", 3, "detected", ("max_new_tokens",))
    path, records = write_task(tmp_path, "empty", LABELS, "")
    assert read_task_spec(path, records, tok).source == "detected"


def test_a_sidecar_kept_elsewhere(tmp_path, tok):
    """The daemon keeps renamed copies (accepted/<sha12>_NAME.jsonl): it names the sidecar."""
    path, records = write_task(tmp_path, "labels", LABELS)
    (tmp_path / "kept.toml").write_text('kind = "generation"\n')
    assert read_task_spec(path, records, tok, sidecar=tmp_path / "kept.toml").source == "sidecar"
    assert read_task_spec(path, records, tok, sidecar=tmp_path / "missing.toml").source == "detected"


@pytest.mark.parametrize(
    "text, line, field, kind, message",
    [
        ('kind = "generation"\nkind = "classification"\n', 2, None, "bad_toml", "not valid TOML"),
        ('kind = "summary"\n', 1, "kind", "bad_value", "'summary' is not one of classification, generation"),
        ('\nmetric = "bleu"\n', 2, "metric", "bad_value", "'bleu' is not one of"),
        ('kind = "generation"\nmax_new_tokens = "48"\n', 2, "max_new_tokens", "bad_type", "whole number, not str"),
        ("max_new_tokens = true\n", 1, "max_new_tokens", "bad_type", "whole number, not bool"),
        ("max_new_tokens = 0\n", 1, "max_new_tokens", "bad_value", "between 1 and 2048, not 0"),
        ("max_new_tokens = 100000\n", 1, "max_new_tokens", "bad_value", "not 100000"),
        ('kind = "generation"\n  "metrc" = "chrf"\n', 2, "metrc", "unknown_field", "may state kind, metric, max_new_tokens"),
        ('kind = "generation"\n\n[task]\nkind = "generation"\n', 3, "task", "unknown_field", "unknown key"),
        ("kind = 3\n", 1, "kind", "bad_type", "must be a string, not int"),
    ],
)
def test_a_bad_sidecar_names_file_line_and_key(tmp_path, text, line, field, kind, message):
    path, records = write_task(tmp_path, "news", HEADLINES, text)
    with pytest.raises(TaskSpecError) as caught:
        read_task_spec(path, records)
    e = caught.value
    assert isinstance(e, ValidationError)  # rejected like a bad task file
    assert (e.file, e.line, e.field, e.kind) == (str(tmp_path / "news.task.toml"), line, field, kind)
    assert message in str(e) and str(e).startswith(f"{tmp_path / 'news.task.toml'}:line {line}")


def test_a_sidecar_that_is_not_text(tmp_path):
    side = tmp_path / "news.task.toml"
    side.write_bytes(b"kind = \xff\xfe\n")
    with pytest.raises(TaskSpecError, match="not UTF-8") as caught:
        read_sidecar(side)
    assert caught.value.kind == "encoding"


@pytest.mark.parametrize("task", ["dbpedia", "agnews", "headlines"])
def test_the_demo_drops_the_same_file_from_either_source(task, monkeypatch):
    """`make demo` from a checkout without ../shared drops the shipped slice; beside it, the
    shared file. Both must be the same bytes, or the holdout split (a function of the file's
    SHA-256), the training and every figure README shows differ."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import demo

    shared = next((d for d in demo.SHARED_DATA if (d / task / "train.jsonl").is_file()), None)
    if shared is None:
        pytest.skip("benchmark data not found beside the checkout")
    from_shared = demo.task_lines(task, 192)
    monkeypatch.setattr(demo, "SHARED_DATA", [])  # as on a machine without ../shared
    assert demo.task_lines(task, 192) == from_shared
