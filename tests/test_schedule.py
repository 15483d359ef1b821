"""The step policy (edgekif.schedule): steps from the data, the LR schedule, the time budget."""

from __future__ import annotations

import math

import pytest

from edgekif.config import Config, load_config
from edgekif.errors import ConfigError
from edgekif.schedule import Deadline, can_stop_before, lr_multiplier, task_steps, warmup_steps

# --------------------------------------------------------------------------- task steps


def test_steps_follow_the_epochs():
    assert task_steps(1000, 8, epochs=1.0) == 125
    assert task_steps(1001, 8) == 126  # a last partial batch is a step
    assert task_steps(128, 8, epochs=2.5) == 40
    assert task_steps(30, 1, epochs=0.1) == 3  # not 4 from 3.0000000000000004


def test_floor_lifts_small_files():
    assert task_steps(48, 8, epochs=1.0) == 6  # what the demo trained before: too few
    assert task_steps(48, 8, epochs=1.0, min_steps=16) == 16
    assert task_steps(1, 8, min_steps=16) == 16
    assert task_steps(1000, 8, min_steps=16) == 125  # the floor only lifts
    assert task_steps(3, 8) == 1  # never zero


def test_cap_bounds_big_files():
    assert task_steps(200_000, 8, max_steps=2000) == 2000
    assert task_steps(100, 8, max_steps=2000) == 13  # the cap only lowers
    assert task_steps(48, 8, min_steps=16, max_steps=16) == 16
    assert task_steps(200_000, 8, min_steps=16, max_steps=0) == 25_000  # 0 = no cap


@pytest.mark.parametrize(
    "args",
    [(0, 8), (10, 0), (10, 8, 0.0), (10, 8, -1.0), (10, 8, math.inf), (10, 8, 1.0, -1), (10, 8, 1.0, 0, -1), (10, 8, 1.0, 20, 10)],
)
def test_bad_step_settings_are_config_errors(args):
    with pytest.raises(ConfigError):
        task_steps(*args)


# --------------------------------------------------------------------------- learning rate


def test_warmup_rises_linearly_to_the_peak():
    total = 20
    assert warmup_steps(total, 0.1) == 2 and warmup_steps(total, 0.0) == 0 and warmup_steps(7, 0.1) == 1
    m = [lr_multiplier(s, total, warmup_ratio=0.25, min_lr_ratio=0.1) for s in range(total)]
    assert m[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 warmup steps, the first not at 0
    assert m[5] < 1.0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_falls_monotonically_to_the_floor(decay):
    total = 16
    m = [lr_multiplier(s, total, warmup_ratio=0.125, min_lr_ratio=0.1, decay=decay) for s in range(total)]
    assert m[:2] == pytest.approx([0.5, 1.0])  # 2 warmup steps, the peak at the second
    after = m[1:]
    assert all(a > b for a, b in zip(after, after[1:])), after
    assert m[-1] == pytest.approx(0.1) and min(m) >= 0.1 - 1e-12


def test_decay_shapes():
    total, warm = 11, 0  # 10 steps of decay after the peak at step 0
    cos = [lr_multiplier(s, total, 0.0, 0.0, "cosine") for s in range(total)]
    lin = [lr_multiplier(s, total, 0.0, 0.0, "linear") for s in range(total)]
    assert cos[warm] == lin[warm] == 1.0 and cos[-1] == pytest.approx(0.0) and lin[-1] == pytest.approx(0.0)
    assert cos[5] == pytest.approx(0.5) and lin[5] == pytest.approx(0.5)  # both halfway at the midpoint
    assert cos[2] > lin[2] and cos[8] < lin[8]  # cosine stays high longer, then falls faster
    assert cos[1] == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert [lr_multiplier(s, total, 0.0, 0.3, "constant") for s in range(total)] == [1.0] * total


def test_lr_edge_cases():
    assert lr_multiplier(0, 1, 0.0, 0.1) == 1.0  # a one-step job trains at the base lr
    assert lr_multiplier(0, 1, 0.5, 0.1) == 1.0  # its warmup is that one step
    assert [lr_multiplier(s, 2, 0.5, 0.1) for s in range(2)] == [1.0, 0.1]  # warmup ends at the peak, then the floor
    assert [lr_multiplier(s, 2, 0.0, 0.1) for s in range(2)] == [1.0, 0.1]
    with pytest.raises(ValueError):
        lr_multiplier(5, 5)
    with pytest.raises(ValueError):
        lr_multiplier(-1, 5)
    with pytest.raises(ConfigError):
        lr_multiplier(0, 5, warmup_ratio=1.0)
    with pytest.raises(ConfigError):
        lr_multiplier(0, 5, min_lr_ratio=1.5)
    with pytest.raises(ConfigError):
        lr_multiplier(0, 5, decay="step")


# --------------------------------------------------------------------------- time budget


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_deadline_expires_after_the_budget():
    clock = FakeClock()
    d = Deadline(2.0, clock=clock)  # minutes
    assert d.limited and not d.expired() and d.remaining() == 120.0
    clock.now += 90
    assert not d.expired() and d.remaining() == 30.0 and d.elapsed() == 90.0
    assert d.expired(next_step_seconds=45.0)  # the next step would end past the budget
    assert not d.expired(next_step_seconds=20.0)
    clock.now += 30
    assert d.expired() and d.remaining() == 0.0
    clock.now += 100
    assert d.remaining() == 0.0  # never negative


def test_no_deadline_without_a_budget():
    clock = FakeClock()
    d = Deadline(0, clock=clock)
    clock.now += 1e9
    assert not d.limited and not d.expired(next_step_seconds=1e9) and d.remaining() == math.inf
    with pytest.raises(ConfigError):
        Deadline(-1)


def test_stops_are_clean_only_between_rounds():
    plain = ["task"] * 5
    assert all(can_stop_before(plain, s) for s in range(6))
    rounds = ["task"] * 3 + ["replay"] * 2 + ["task"] * 3 + ["replay"] * 2
    ok = [s for s in range(len(rounds) + 1) if can_stop_before(rounds, s)]
    assert ok == [0, 5, 10]  # start, after each fusion, the end
    with pytest.raises(ValueError):
        can_stop_before(rounds, 11)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_overrides():
    t = Config().train
    assert (t.epochs, t.min_steps, t.steps_cap, t.max_steps) == (1.0, 16, 2000, 0)
    assert (t.warmup_ratio, t.min_lr_ratio, t.lr_decay, t.max_minutes) == (0.0, 1.0, "cosine", 0.0)  # a constant rate until a sweep measures warmup/decay
    c = load_config(None, ["train.min_steps=8", "train.steps_cap=0", "train.max_minutes=2.5", "train.lr_decay=linear"])
    assert (c.train.min_steps, c.train.steps_cap, c.train.max_minutes, c.train.lr_decay) == (8, 0, 2.5, "linear")
    assert task_steps(48, c.train.batch_size, c.train.epochs, c.train.min_steps, c.train.steps_cap) == 8


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.min_steps=-1", "train.min_steps"),
        ("train.steps_cap=-5", "train.steps_cap"),
        ("train.max_minutes=-1", "train.max_minutes"),
        ("train.warmup_ratio=1.0", "train.warmup_ratio"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio"),
        ("train.lr_decay=step", "train.lr_decay"),
        ("train.loss_average=sum", "train.loss_average"),
        ("train.epochs=0", "train.epochs"),
    ],
)
def test_bad_policy_settings_name_the_option(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_floor_above_cap_is_rejected():
    with pytest.raises(ConfigError, match="train.min_steps"):
        load_config(None, ["train.min_steps=50", "train.steps_cap=10"])
