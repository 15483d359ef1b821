"""General rehearsal (edgekif.rehearsal): the base's own answers to a second prompt set, mixed
into replay batches; on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from edgekif.config import Config, LoRAConfig, TrainConfig, load_config
from edgekif.continual import StreamTask, learn_task
from edgekif.errors import ConfigError
from edgekif.general_ability import GeneralPrompt, load_prompts
from edgekif.model import add_lora
from edgekif.records import Record
from edgekif.rehearsal import GENERAL_TASK_ID, _last_sentence_end, base_rehearsal_records, load_rehearsal_prompts, mix_general
from edgekif.replay import ReplayBuffer
from edgekif.strategies import KIFConfig
from edgekif import trainer as trainer_module
from edgekif.trainer import Learner
from tiny_models import tiny_llama

PROMPTS = [GeneralPrompt(f"p{i}", "factual", (("user", f"Tell me about thing number {i}."),)) for i in range(6)]


def _general(n: int = 10) -> list[Record]:
    return [Record.from_prompt(f"general {i}", f"answer {i}.", id=f"general/g{i}") for i in range(n)]


def _tasks(n: int, seed: int) -> list[Record]:
    return [Record.from_prompt(f"task {seed}-{i}", "x", id=f"t{seed}-{i}") for i in range(n)]


def test_the_shipped_rehearsal_prompts_are_valid_and_share_nothing_with_the_gate_s():
    rehearsal, gate = load_rehearsal_prompts(), load_prompts()
    assert len(rehearsal) >= 100
    assert {p.category for p in rehearsal} == {p.category for p in gate}  # every kind of request the gate asks
    texts = lambda ps: {" ".join(c for _, c in p.messages).strip().lower() for p in ps}  # noqa: E731
    assert not texts(rehearsal) & texts(gate)  # the gate measures on prompts training never saw
    assert not {p.id for p in rehearsal} & {p.id for p in gate}


def test_mix_general_puts_its_share_in_each_batch_and_is_seeded():
    mixed = mix_general(_tasks, _general(), 0.25)
    batch = mixed(8, 7)
    general = [r for r in batch if r.id.startswith("general/")]
    assert len(batch) == 8 and len(general) == 2  # ceil(0.25 * 8)
    assert [r.id for r in mixed(8, 7)] == [r.id for r in batch]  # the same seed, the same batch
    # fewer task records than asked: rehearsal fills up; none at all: no replay batch
    short = mix_general(lambda n, seed: _tasks(min(n, 3), seed), _general(), 0.25)(8, 1)
    assert len(short) == 8 and sum(r.id.startswith("general/") for r in short) == 5
    assert mix_general(lambda n, seed: [], _general(), 0.25)(8, 1) == []
    # the trainer probes with n=1 whether there is replay at all: a past task's record answers
    assert [r.id[0] for r in mixed(1, 0)] == ["t"]
    # off, nothing to mix, or no past task (a first task trains without replay steps): unchanged
    assert mix_general(_tasks, _general(), 0.0) is _tasks and mix_general(_tasks, [], 0.5) is _tasks
    assert mix_general(None, _general(), 0.5) is None


def test_seeds_pick_different_rehearsal_records():
    mixed = mix_general(_tasks, _general(40), 0.25)
    picks = {tuple(r.id for r in mixed(8, seed) if r.id.startswith("general/")) for seed in range(5)}
    assert len(picks) > 1


def test_a_budget_cut_answer_ends_at_its_last_full_sentence():
    assert _last_sentence_end("Paris is the capital. It has the Eiffel") == "Paris is the capital."
    assert _last_sentence_end("Dr. Smith arrived late!  Then the") == "Dr. Smith arrived late!"
    assert _last_sentence_end("no sentence end here") == ""
    assert _last_sentence_end("3.5 is a number") == ""  # a decimal point is not a sentence end


def test_rehearsal_answers_come_from_the_base_with_the_adapter_off_and_are_cached(tmp_path, monkeypatch):
    model, tok = tiny_llama(seed=0)
    model = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
    calls: list[bool] = []
    # what the tiny random model would say is noise ("" mostly): the generator is stubbed; the
    # adapter's state while it runs is what this test checks
    answers = {0: "The first answer.", 1: "", 2: "A long answer that the budget cut. It went on and on and on and",
               3: "cut with no sentence end " + "x " * 40, 4: "Five.", 5: "Six!"}

    def fake_generate(m, t, records, *, max_new_tokens):
        calls.append(all(layer.disable_adapters for layer in lora_layers))
        return [answers[int(r.messages[-1][1].split()[-1].rstrip("."))] for r in records]

    monkeypatch.setattr("edgekif.evaluate.generate_answers", fake_generate)
    assert lora_layers and not any(layer.disable_adapters for layer in lora_layers)
    got = base_rehearsal_records(model, tok, tmp_path, "tiny/torch-fp32", 24, prompts=PROMPTS)
    assert calls and all(calls)  # generated with every LoRA layer switched off: the base's answers
    assert not any(layer.disable_adapters for layer in lora_layers)  # and switched back on after
    # the empty answer is left out; an answer cut by the 24-token budget ends at its last full
    # sentence, or is left out without one
    assert [(r.id, r.output) for r in got] == [("general/p0", "The first answer."), ("general/p2", "A long answer that the budget cut."),
                                               ("general/p4", "Five."), ("general/p5", "Six!")]
    by_id = {f"general/{p.id}": p for p in PROMPTS}
    assert all(r.messages == by_id[r.id].messages and r.meta["task_id"] == GENERAL_TASK_ID for r in got)
    # the second call reads the cache: the generator is not asked again
    calls.clear()
    again = base_rehearsal_records(model, tok, tmp_path, "tiny/torch-fp32", 24, prompts=PROMPTS)
    assert calls == [] and [r.output for r in again] == [r.output for r in got] and len(list(tmp_path.iterdir())) == 1


def test_rehearsal_joins_the_replay_batches_of_later_tasks_only(tmp_path):
    model, tok = tiny_llama(seed=0)
    model = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    cfg = Config()
    cfg.train = TrainConfig(strategy="recurrent_kif", lr=5e-3, batch_size=4, max_steps=4, checkpoint_every=0, seed=3)
    cfg.kif = KIFConfig(inner_steps=2, outer_steps=1, outer_lr=5e-3, replay_batch_size=4)
    cfg.data.max_length = 48
    cfg.replay.general_share = 0.25
    learner = Learner.create(cfg, model, tok)
    asked: list[int] = []
    learner.rehearsal_source = lambda: asked.append(1) or _general()
    replayed: list[str] = []
    real_encode = trainer_module.encode_example

    def spy(tokenizer, record, *a, **kw):  # the records each replay batch encodes
        if record.id.startswith(("general/", "a")):
            replayed.append(record.id)
        return real_encode(tokenizer, record, *a, **kw)

    records = lambda name: [Record.from_prompt(f"{name} item {i}", "alpha", id=f"{name}{i}") for i in range(8)]  # noqa: E731
    with ReplayBuffer(tmp_path / "replay.db", cfg.replay) as buf, pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "encode_example", spy)
        first = learn_task(learner, buf, StreamTask("a", records("a")))
        assert first.replay_steps == 0  # a first task: no past task, no replay steps, rehearsal or not
        assert asked == []  # ... and the base is not asked for its answers
        replayed.clear()
        second = learn_task(learner, buf, StreamTask("b", records("b")))
    assert second.replay_steps == 2 and second.task_steps == 4  # Q=2/M=1 over 4 task steps
    # each replay batch of 4: ceil(0.25 * 4) = 1 of the base's answers, 3 of task a's records
    assert sum(i.startswith("general/") for i in replayed) == 2 and sum(i.startswith("a") for i in replayed) == 6


def test_general_share_is_validated():
    assert load_config(None, ["replay.general_share=0.25"]).replay.general_share == 0.25
    with pytest.raises(ConfigError, match="replay.general_share"):
        load_config(None, ["replay.general_share=1"])
    with pytest.raises(ConfigError, match="general_max_new_tokens"):
        load_config(None, ["replay.general_max_new_tokens=0"])


def _answers_file(folder, base_id: str, answers: dict[str, str], budget: int = 24):
    from edgekif.general_ability import CACHE_FORMAT, cache_path, prompts_sha256

    path = cache_path(folder, base_id, PROMPTS, budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": CACHE_FORMAT, "base_id": base_id, "prompts_sha256": prompts_sha256(PROMPTS),
                                "max_new_tokens": budget, "answers": answers}))
    return path


def test_shipped_answers_serve_a_cache_miss_for_their_own_key_only(tmp_path):
    from edgekif.general_ability import cached_base_answers

    shipped = {p.id: f"shipped {p.id}." for p in PROMPTS}
    _answers_file(tmp_path / "shipped", "tiny/torch-fp32", shipped)
    opened: list[int] = []

    class Runner:
        def generate(self, chat, max_new_tokens=64):
            return "computed."

    def open_runner():
        opened.append(1)
        return Runner()

    got = cached_base_answers(tmp_path / "cache", "tiny/torch-fp32", PROMPTS, 24, open_runner, shipped=tmp_path / "shipped")
    assert got == [shipped[p.id] for p in PROMPTS] and opened == []  # the base was never opened
    assert not (tmp_path / "cache").exists()  # and nothing copied: the shipped file is the cache
    # another base, precision or budget misses the shipped key: answered on the machine
    other = cached_base_answers(tmp_path / "cache", "tiny/torch-bf16", PROMPTS, 24, open_runner, shipped=tmp_path / "shipped")
    assert other == ["computed."] * len(PROMPTS) and opened == [1]
    # a shipped file whose inside names another key (renamed by hand) is not trusted
    renamed = _answers_file(tmp_path / "odd", "tiny/torch-fp32", shipped)
    data = json.loads(renamed.read_text())
    renamed.write_text(json.dumps({**data, "base_id": "someone-else"}))
    cached_base_answers(tmp_path / "cache2", "tiny/torch-fp32", PROMPTS, 24, open_runner, shipped=tmp_path / "odd")
    assert opened == [1, 1]


@pytest.mark.parametrize("text", ["{\"format\": 1, \"answers\": {\"p0\": \"cut off", "[1, 2]", ""])
def test_a_half_written_or_malformed_answers_file_is_answered_again_and_replaced(tmp_path, text):
    """A cache or shipped file that is cut short, not an object, or empty is never used: the base
    answers again and the cache gets a whole file (written atomically)."""
    from edgekif.general_ability import cache_path, cached_base_answers

    class Runner:
        def generate(self, chat, max_new_tokens=64):
            return "computed."

    for folder in (tmp_path / "cache", tmp_path / "shipped"):
        path = cache_path(folder, "tiny/torch-fp32", PROMPTS, 24)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    got = cached_base_answers(tmp_path / "cache", "tiny/torch-fp32", PROMPTS, 24, Runner, shipped=tmp_path / "shipped")
    assert got == ["computed."] * len(PROMPTS)
    saved = json.loads(cache_path(tmp_path / "cache", "tiny/torch-fp32", PROMPTS, 24).read_text())
    assert saved["answers"] == {p.id: "computed." for p in PROMPTS}


def test_a_cache_that_cannot_be_written_costs_a_recomputation_not_the_job(tmp_path, caplog):
    from edgekif.general_ability import cached_base_answers

    class Runner:
        def generate(self, chat, max_new_tokens=64):
            return "computed."

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="edgekif.general_ability"):
        got = cached_base_answers(blocker / "rehearsal", "tiny/torch-fp32", PROMPTS, 24, Runner)
    assert got == ["computed."] * len(PROMPTS)
    assert any(r.getMessage() == "base answers not cached" for r in caplog.records)


def test_the_shipped_default_base_answers_match_todays_prompts_and_budget():
    """Editing rehearsal_prompts.jsonl or the budget without running tools/rehearsal_answers.py
    would silently cost every install the answers' generation again: this fails first."""
    from importlib import resources

    from edgekif.config import ReplayConfig
    from edgekif.general_ability import CACHE_FORMAT, prompts_sha256
    from edgekif.rehearsal import SHIPPED_ANSWERS

    folder = resources.files("edgekif").joinpath(SHIPPED_ANSWERS)
    files = [f for f in folder.iterdir() if f.name.endswith(".json")]
    assert files, "no shipped rehearsal answers"
    prompts = load_rehearsal_prompts()
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        assert data["format"] == CACHE_FORMAT and data["prompts_sha256"] == prompts_sha256(prompts)
        assert data["max_new_tokens"] == ReplayConfig().general_max_new_tokens
        assert sorted(data["answers"]) == sorted(p.id for p in prompts)
        assert sum(bool(a.strip()) for a in data["answers"].values()) >= 120  # real answers, not a stub


@pytest.mark.integration
def test_the_default_base_rehearses_from_the_shipped_answers_without_generating(smollm2, tmp_path, monkeypatch):
    """The key the daemon computes for the default base at the defaults is the shipped file's."""
    from types import SimpleNamespace

    from edgekif.model import load_tokenizer, resolve_device, resolve_precision
    from edgekif.workflow import rehearsal_records

    def no_generation(*a, **kw):
        raise AssertionError("the base was asked for its answers: the shipped file's key does not match")

    monkeypatch.setattr("edgekif.evaluate.generate_answers", no_generation)
    cfg = Config()
    precision = resolve_precision(cfg.model.precision, resolve_device(cfg.model.device), smollm2.path)
    learner = SimpleNamespace(model=None, tokenizer=load_tokenizer(smollm2.path))
    records = rehearsal_records(cfg, smollm2, precision, learner, cache_dir=tmp_path / "empty-cache")
    assert len(records) >= 120 and all(r.meta["task_id"] == GENERAL_TASK_ID for r in records)
