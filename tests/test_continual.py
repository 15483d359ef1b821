"""The one continual loop (edgekif.continual) and the strategy lifecycle, on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgekif.config import Config, LoRAConfig, TrainConfig, load_config
from edgekif.continual import StreamTask, learn_task, run_stream
from edgekif.model import add_lora
from edgekif.records import Record
from edgekif.replay import ReplayBuffer
from edgekif.strategies import STRATEGIES, KIFConfig, ReplayScheduleConfig, strategy_config, strategy_names
from edgekif.trainer import Learner, has_learner, read_learner_meta
from tiny_models import tiny_llama

WORDS = ["alpha", "beta", "gamma", "delta"]


def _records(name: str, n: int = 12) -> list[Record]:
    return [Record.from_prompt(f"{name} item {i}: which word?", WORDS[i % 4], id=f"{name}_{i}") for i in range(n)]


def _learner(strategy: str, max_steps: int = 3) -> Learner:
    model, tok = tiny_llama(seed=0)
    model = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    cfg = Config()
    cfg.train = TrainConfig(strategy=strategy, lr=5e-3, batch_size=4, max_steps=max_steps, checkpoint_every=0, seed=3)
    cfg.kif = KIFConfig(inner_steps=2, outer_steps=1, outer_lr=5e-3, replay_batch_size=4)
    cfg.experience_replay = ReplayScheduleConfig(inner_steps=2, outer_steps=1, replay_batch_size=4)
    cfg.data.max_length = 48
    return Learner.create(cfg, model, tok)


@pytest.fixture()
def buffer(tmp_path):
    with ReplayBuffer(tmp_path / "replay.db", Config().replay) as buf:
        yield buf


class SpySampler:
    """Wraps ReplayBuffer.sample to record which tasks each draw was allowed."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, ...]] = []
        real = ReplayBuffer.sample

        def spy(buf, n, seed, task_ids=None):
            self.calls.append(tuple(task_ids or ()))
            return real(buf, n, seed, task_ids=task_ids)

        monkeypatch.setattr(ReplayBuffer, "sample", spy)


def test_learn_task_replays_only_allowed_past_tasks_then_remembers(buffer, monkeypatch):
    spy = SpySampler(monkeypatch)
    learner = _learner("replay")
    for name in ("a", "b"):
        learn_task(learner, buffer, StreamTask(name, _records(name)))
    assert buffer.tasks() == ["a", "b"]
    assert spy.calls and set(spy.calls) == {("a",)}  # task b replayed a, never itself
    spy.calls.clear()
    # the daemon: only published tasks may be replayed, and the buffer step already stored c
    buffer.add_task("c", _records("c"))
    learn_task(learner, buffer, StreamTask("c", _records("c")), past_tasks=["b"], remember=False)
    assert set(spy.calls) == {("b",)}


def test_a_strategy_without_replay_never_samples(buffer, monkeypatch):
    spy = SpySampler(monkeypatch)
    learner = _learner("seq_lora")
    run_stream(learner, buffer, [StreamTask(n, _records(n)) for n in ("a", "b", "c")])
    assert spy.calls == []
    assert buffer.tasks() == ["a", "b", "c"]  # remembered all the same


def test_run_stream_fills_the_accuracy_matrix_in_order(buffer):
    learner = _learner("recurrent_kif")
    scored: list[tuple[int, str]] = []

    def evaluate(lrn, name):
        scored.append((len(lrn.tasks_seen), name))
        return {"a": 0.5, "b": 0.25, "c": 1.0}[name]

    res = run_stream(learner, buffer, [StreamTask(n, _records(n)) for n in ("a", "b", "c")], evaluate=evaluate, score_before=True)
    # before b and c (FWT), then after each task every task seen so far
    assert scored == [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (2, "c"), (3, "a"), (3, "b"), (3, "c")]
    assert res.matrix.get(0, 1) == 0.25 and res.matrix.get(2, 2) == 1.0 and res.matrix.get(0, 2) is None
    assert [r.task_id for r in res.results] == ["a", "b", "c"]
    assert learner.tasks_seen == ["a", "b", "c"]


def test_run_stream_can_score_only_the_cells_the_metrics_read(buffer):
    """cells="metrics": each task just after learning it, and every task after the last one;
    OP, BWT and plasticity are the same as from the whole triangle, the middle cells missing."""
    learner = _learner("seq_lora")
    scored: list[tuple[int, str]] = []
    score_of = {"a": 0.5, "b": 0.25, "c": 1.0}

    def evaluate(lrn, name):
        scored.append((len(lrn.tasks_seen), name))
        return score_of[name]

    res = run_stream(learner, buffer, [StreamTask(n, _records(n)) for n in ("a", "b", "c")], evaluate=evaluate, cells="metrics")
    assert scored == [(1, "a"), (2, "b"), (3, "a"), (3, "b"), (3, "c")]  # 2T-1 = 5 of T(T+1)/2 = 6
    m = res.matrix
    assert m.get(1, 0) is None and m.get(0, 0) == 0.5 and m.get(1, 1) == 0.25
    assert m.op() == pytest.approx(1.75 / 3) and m.bwt() == 0.0 and m.plasticity() == pytest.approx(1.75 / 3)
    with pytest.raises(ValueError, match="cells"):
        run_stream(learner, buffer, [], cells="some")


def test_joint_strategy_trains_once_on_the_union_with_every_tasks_budget(buffer):
    learner = _learner("mtl", max_steps=3)
    res = run_stream(learner, buffer, [StreamTask(n, _records(n)) for n in ("a", "b")], evaluate=lambda lrn, name: 0.5)
    (only,) = res.results
    # the replay strategies' steps on this stream (Q=2, M=1): 3 on a, then 2+1 and 1+1 on b
    assert only.task_id == "a+b" and only.task_steps == 3 + (3 + 2)
    assert only.examples == 8 * 4
    assert res.matrix.get(1, 0) == 0.5 and res.matrix.get(1, 1) == 0.5 and res.matrix.get(0, 0) is None
    assert buffer.tasks() == []  # the upper bound keeps no replay buffer


def test_joint_steps_match_the_replay_strategies_on_the_standard_profile():
    from edgekif.config import Config
    from edgekif.continual import joint_steps

    cfg = Config()
    cfg.train.max_steps = 16
    assert joint_steps(cfg, [128] * 4) == 16 * 4 + 8 * 3  # 2 rounds of Q=8 + M=4 on each later task
    cfg.kif.outer_steps = 0
    assert joint_steps(cfg, [128] * 4) == 64
    cfg = Config()  # by epochs: 144 examples at batch 8 = 18 steps; 48 -> the 16-step floor
    assert joint_steps(cfg, [144, 48]) == 18 + (16 + 2 * 4)


@pytest.mark.parametrize("strategy", ["replay", "mtl"])
def test_each_record_is_encoded_with_its_own_tasks_answer_budget(buffer, monkeypatch, strategy):
    import edgekif.trainer as trainer

    seen: list[tuple[str, int]] = []
    real = trainer.encode_example

    def spy(tok, record, max_length, answer_budget=0):
        seen.append((record.id.split("_")[0], answer_budget))
        return real(tok, record, max_length, answer_budget=answer_budget)

    monkeypatch.setattr(trainer, "encode_example", spy)
    learner = _learner(strategy)
    learner.answer_budgets = {"a": 7, "b": 9}
    tasks = [StreamTask(n, _records(n)) for n in ("a", "b")]
    for t in tasks:
        for r in t.records:
            r.meta["task_id"] = t.name
    run_stream(learner, buffer, tasks)
    assert set(seen) == {("a", 7), ("b", 9)}  # task, replay (buffer rows name their task) and union records alike


def test_registry_ties_every_strategy_to_its_config():
    assert strategy_names() == list(STRATEGIES)
    cfg = load_config(None, ["kif.inner_steps=5", "kif.mask_quantile=0.9", "experience_replay.inner_steps=5"])
    assert strategy_config("recurrent_kif", cfg).mask_quantile == 0.9
    assert strategy_config("replay", cfg).inner_steps == 5
    assert dataclasses.fields(strategy_config("seq_lora", cfg)) == ()
    for name, spec in STRATEGIES.items():
        cls = spec.load()
        assert cls.name == name and isinstance(strategy_config(name, cfg), spec.config_cls)
    # replay has its own section: KIF's options do not reach it
    assert strategy_config("replay", load_config(None, ["kif.inner_steps=5"])).inner_steps == 2
    from edgekif.config import ConfigError

    with pytest.raises(ConfigError, match="recurrent_kif"):
        load_config(None, ["train.strategy=nope"])


def test_lifecycle_setup_once_fresh_optimizers_per_task_importance_persists(buffer):
    learner = _learner("recurrent_kif")
    s = learner.strategy
    inner = s.inner
    learn_task(learner, buffer, StreamTask("a", _records("a")))
    opt_a = s.optimizers["inner"]
    sens = {n: t.clone() for n, t in inner.sensitivity.items()}
    assert any(bool(t.abs().sum() > 0) for t in sens.values())
    learn_task(learner, buffer, StreamTask("b", _records("b")))
    assert s.inner is inner  # set up once: the same trackers across tasks
    assert s.optimizers["inner"] is not opt_a  # a fresh optimizer for task b
    assert any(not torch.equal(sens[n], inner.sensitivity[n]) for n in sens)
    assert s.fusions == 2  # per task: b had two rounds (3 task steps, Q=2)


def test_learner_folder_keeps_persistent_state_only(tmp_path, buffer):
    learner = _learner("recurrent_kif")
    learn_task(learner, buffer, StreamTask("a", _records("a")))
    learner.save(tmp_path / "learner")
    assert has_learner(tmp_path / "learner") and read_learner_meta(tmp_path / "learner").tasks_seen == ["a"]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "learner" / "strategy_state.safetensors")).keys()
    assert keys and all(k.startswith(("inner.", "outer.")) for k in keys)
    assert set(learner.strategy.checkpoint_state()) >= set(keys) | {"fusions"}


@pytest.mark.parametrize("kind,scale", [("generation", 0.5), ("classification", 1.0), (None, 1.0)])
def test_a_free_text_task_trains_both_loops_at_the_kinds_rate(buffer, kind, scale):
    # train.generation_lr_scale (0.5 by default) scales the inner and the outer rate of a
    # free-text task's job; labels and tasks of unknown kind keep the configured rates
    learner = _learner("recurrent_kif")
    assert learner.cfg.train.generation_lr_scale == 0.5
    learn_task(learner, buffer, StreamTask("a", _records("a")))
    res = learn_task(learner, buffer, StreamTask("b", _records("b"), kind=kind))  # b replays a: both loops run
    assert res.replay_steps > 0 and res.lr_scale == scale
    s = learner.strategy
    assert [g["lr"] for g in s.optimizers["inner"].param_groups] == [pytest.approx(5e-3 * scale)]
    assert [g["lr"] for g in s.optimizers["outer"].param_groups] == [pytest.approx(5e-3 * scale)]


@pytest.mark.parametrize("kinds,scale", [(("generation", "generation"), 0.5), (("classification", "generation"), 1.0)])
def test_joint_training_takes_the_streams_kind_only_when_every_task_shares_it(buffer, kinds, scale):
    learner = _learner("mtl")
    learner.cfg.train.generation_lr_scale = 0.25
    res = run_stream(learner, buffer, [StreamTask(n, _records(n), kind=k) for n, k in zip("ab", kinds)])
    assert [r.lr_scale for r in res.results] == [scale if scale == 1.0 else 0.25]
    assert [g["lr"] for g in learner.strategy.optimizers["main"].param_groups] == [pytest.approx(5e-3 * res.results[0].lr_scale)]
