"""Recurrent-KIF mechanics, checked with numbers: masks, fusion, EMAs, schedule, replay use,
resume equality. Tiny model only."""

from __future__ import annotations

import math

import pytest
import torch

from edgekif.config import Config, LoRAConfig, TrainConfig
from edgekif.importance import FusionWeights, ImportanceTracker, fuse, top_share_masks
from edgekif.model import add_lora
from edgekif.records import Record
from edgekif.strategies import REPLAY, TASK, STRATEGIES, KIFConfig, make_strategy
from edgekif.strategies.base import interleaved_schedule
from edgekif.trainer import Learner
from tiny_models import tiny_llama

# ----------------------------------------------------------------------------- masks


def test_mask_selects_exactly_top_share_globally():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 7, generator=g), "b": torch.rand(33, generator=g) * 2}  # b mostly larger
    masks = top_share_masks(scores, 0.8)
    n = 70 + 33
    assert sum(int(m.sum()) for m in masks.values()) == round(n * 0.2)
    flat = torch.cat([scores["a"].flatten(), scores["b"].flatten()])
    kept = torch.cat([scores["a"][masks["a"]], scores["b"][masks["b"]]])
    dropped = flat[~torch.cat([masks["a"].flatten(), masks["b"].flatten()])]
    assert kept.min() >= dropped.max()  # every kept score beats every dropped one
    assert masks["b"].sum() > masks["a"].sum()  # global, not per-tensor
    assert masks["a"].dtype == torch.bool


def test_mask_exact_count_with_ties():
    scores = {"x": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
    m = top_share_masks(scores, 0.8)["x"]  # top 20% of 10 = 2, all candidates tie at 1.0
    assert int(m.sum()) == 2 and bool(m[:4].sum() == 2)


def test_threshold_on_20m_elements_without_quantile():
    g = torch.Generator().manual_seed(1)
    big = {"w1": torch.rand(12_000_000, generator=g), "w2": torch.rand(8_000_000, generator=g)}
    with pytest.raises(RuntimeError):
        torch.quantile(torch.cat([big["w1"], big["w2"]]), 0.8)  # the reason we don't use it
    masks = top_share_masks(big, 0.8)
    assert sum(int(m.sum()) for m in masks.values()) == 4_000_000
    thr = min(big["w1"][masks["w1"]].min(), big["w2"][masks["w2"]].min())
    assert abs(float(thr) - 0.8) < 1e-3  # uniform data: the 80th percentile is ~0.8


# ----------------------------------------------------------------------------- fusion


def test_fusion_matches_formula_on_hand_made_tensors():
    theta_b = torch.tensor([1.0, 1.0, 1.0, 1.0])
    tau_in = torch.tensor([10.0, 10.0, 10.0, 10.0])
    tau_out = torch.tensor([100.0, 100.0, 100.0, 100.0])
    m_in = torch.tensor([True, True, False, False])
    m_out = torch.tensor([True, False, True, False])
    out = fuse(theta_b, tau_in, tau_out, m_in, m_out, FusionWeights())
    # both: 1+0.4*10+0.6*100 ; only in: 1+10 ; only out: 1+100 ; neither: 1+5+50
    assert torch.allclose(out, torch.tensor([65.0, 11.0, 101.0, 56.0]))
    custom = fuse(theta_b, tau_in, tau_out, m_in, m_out, FusionWeights(0.5, 0.5, 0.0, 0.0))
    assert torch.allclose(custom, torch.tensor([56.0, 11.0, 101.0, 1.0]))


def test_ema_updates_as_defined():
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    tr = ImportanceTracker({"p": p}, beta1=0.5, beta2=0.25)
    p.grad = torch.tensor([3.0, 4.0])  # I = |w*g| = [6, 4]
    tr.update({"p": p})
    s1 = torch.tensor([3.0, 2.0])  # 0.5*0 + 0.5*I
    u1 = 0.75 * (torch.tensor([6.0, 4.0]) - s1).abs()  # 0.25*0 + 0.75*|I - s1|
    assert torch.allclose(tr.sensitivity["p"], s1) and torch.allclose(tr.uncertainty["p"], u1)
    p.grad = torch.tensor([0.0, 1.0])  # I = [0, 1]
    tr.update({"p": p})
    s2 = 0.5 * s1 + 0.5 * torch.tensor([0.0, 1.0])
    u2 = 0.25 * u1 + 0.75 * (torch.tensor([0.0, 1.0]) - s2).abs()
    assert torch.allclose(tr.sensitivity["p"], s2) and torch.allclose(tr.uncertainty["p"], u2)
    assert torch.allclose(tr.score("p"), s2 * u2)


def test_non_finite_gradient_leaves_that_tensor_untouched():
    """A tensor whose gradient holds inf/nan keeps its EMAs (the others are updated): the
    check runs on the device, without a host sync per tensor."""
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    q = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    tr = ImportanceTracker({"p": p, "q": q}, beta1=0.5, beta2=0.25)
    p.grad, q.grad = torch.tensor([3.0, 4.0]), torch.tensor([2.0, 2.0])
    tr.update({"p": p, "q": q})
    s_p, u_p = tr.sensitivity["p"].clone(), tr.uncertainty["p"].clone()
    p.grad, q.grad = torch.tensor([float("nan"), 1.0]), torch.tensor([2.0, float("inf")])
    tr.update({"p": p, "q": q})
    assert torch.equal(tr.sensitivity["p"], s_p) and torch.equal(tr.uncertainty["p"], u_p)
    assert torch.equal(tr.sensitivity["q"], torch.tensor([1.0, 1.0]))  # 0.5*0 + 0.5*2, unchanged by the inf step
    assert torch.isfinite(tr.score("q")).all()
    p.grad, q.grad = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])
    tr.update({"p": p, "q": q})
    assert torch.allclose(tr.sensitivity["p"], 0.5 * s_p + 0.5 * torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------------------- schedule and loop

WORDS = ["alpha", "beta", "gamma", "delta"]


def _task(name: str, n: int = 16) -> list[Record]:
    return [Record.from_prompt(f"{name} item {i}: which word?", WORDS[i % 4], id=f"{name}_{i}") for i in range(n)]


def _learner(strategy: str, **train_kw) -> Learner:
    model, tok = tiny_llama(seed=0)
    model = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    cfg = Config()
    cfg.train = TrainConfig(strategy=strategy, lr=5e-3, batch_size=4, max_steps=6, checkpoint_every=0, seed=3, **train_kw)
    cfg.kif = KIFConfig(inner_steps=3, outer_steps=2, outer_lr=5e-3, replay_batch_size=4)
    cfg.data.max_length = 64
    return Learner.create(cfg, model, tok)


def test_interleaved_schedule_shape():
    assert interleaved_schedule(7, 3, 2, True) == [TASK] * 3 + [REPLAY] * 2 + [TASK] * 3 + [REPLAY] * 2 + [TASK] + [REPLAY] * 2
    assert interleaved_schedule(5, 3, 2, False) == [TASK] * 5


def test_outer_loop_draws_only_replay_data_and_fuses_each_round():
    learner = _learner("recurrent_kif")
    learner.train_task("t0", _task("t0"))  # first task: plain LoRA, no fusion
    assert learner.strategy.fusions == 0 and learner.strategy.inner.updates == 6
    past = _task("t0")
    calls: list[int] = []

    def replay(n, seed):
        calls.append(n)
        return past[:n]

    new = _task("t1")
    seen_outer: list[set] = []
    orig_update = learner.strategy.outer.update

    def spy(params):  # record which prompts fed the outer loop's gradients
        seen_outer.append(True)
        return orig_update(params)

    learner.strategy.outer.update = spy
    res = learner.train_task("t1", new, replay=replay)
    assert res.task_steps == 6 and res.replay_steps == 4  # two rounds of 3 inner + 2 outer
    assert learner.strategy.fusions == 2
    assert len(seen_outer) == 4
    assert calls[1:] == [4, 4, 4, 4]  # (first call is the availability probe)


def test_shared_optimizer_is_stepped_by_both_loops():
    """kif.shared_optimizer: one optimizer whose moments both loops update (the authors' code);
    the default keeps one per loop, the outer one at kif.outer_lr."""
    past, new = _task("t0"), _task("t1")
    learner = _learner("recurrent_kif")
    learner.cfg.kif.outer_lr = 1e-3
    learner.train_task("t0", past)
    learner.train_task("t1", new, replay=lambda n, seed: past[:n])
    opts = learner.strategy.optimizers
    assert set(opts) == {"inner", "outer"} and opts["outer"].param_groups[0]["lr"] <= 1e-3
    assert learner.strategy.optimizer(REPLAY) is opts["outer"] and learner.strategy.optimizer(TASK) is opts["inner"]

    shared = _learner("recurrent_kif")
    shared.cfg.kif.shared_optimizer = True
    shared.train_task("t0", past)
    res = shared.train_task("t1", new, replay=lambda n, seed: past[:n])
    (only,) = shared.strategy.optimizers.values()
    assert shared.strategy.optimizer(REPLAY) is only and shared.strategy.optimizer(TASK) is only
    steps = {int(st["step"]) for st in only.state.values()}
    assert steps == {res.task_steps + res.replay_steps} and res.replay_steps == 4  # every step of both loops
    assert shared.strategy.fusions == 2


def test_fusion_in_the_loop_equals_the_formula():
    """Run one round by hand through the strategy hooks and compare with fuse()."""
    learner = _learner("recurrent_kif")
    s = learner.strategy
    params = learner.params
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.1)
    s.before_step(TASK, None)
    theta_b = {n: p.detach().clone() for n, p in params.items()}
    for kind, prev, nxt, delta in [(TASK, None, REPLAY, 0.01), (REPLAY, TASK, None, 0.1)]:
        if kind == REPLAY:
            s.before_step(REPLAY, TASK)
            theta_in = {n: p.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = torch.randn_like(p)
        s.after_backward(kind)
        with torch.no_grad():
            for p in params.values():
                p.add_(delta)
        if kind == REPLAY:
            theta_out = {n: p.detach().clone() for n, p in params.items()}
        s.after_step(kind, nxt)
    m_in = top_share_masks(s.inner.scores(), 0.8)
    m_out = top_share_masks(s.outer.scores(), 0.8)
    for n, p in params.items():
        want = fuse(theta_b[n], theta_in[n] - theta_b[n], theta_out[n] - theta_in[n], m_in[n], m_out[n], FusionWeights())
        assert torch.allclose(p, want)
    assert s.fusions == 1


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_through_the_same_loop_and_learns(name):
    learner = _learner(name, epochs=1.0)
    learner.cfg.train.max_steps = 12
    records = _task("t0")
    res = learner.train_task("t0", records, replay=lambda n, seed: records[:n])
    assert res.strategy == name
    assert res.last_loss < res.mean_loss or res.last_loss < 3.0  # loss falls on a repeated task
    assert math.isfinite(res.mean_loss)


@pytest.mark.parametrize("kind", [None, "generation"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    """A run stopped mid-task and resumed from its checkpoint ends with identical weights; for
    a free-text task too, whose rates are scaled (a resume that lost the factor would differ)."""
    from edgekif.errors import Interrupted

    past = _task("t0")
    new = _task("t1")

    def run(stop_at: int | None, ckpt, kind=kind):
        learner = _learner("recurrent_kif", deterministic=True)
        learner.cfg.train.checkpoint_every = 2
        learner.train_task("t0", past)
        counter = {"n": 0}

        def should_stop():
            counter["n"] += 1
            return stop_at is not None and counter["n"] > stop_at

        try:
            learner.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt, should_stop=should_stop, task_kind=kind)
            return learner
        except Interrupted:
            pass
        # a new process would rebuild everything from scratch and load the checkpoint
        fresh = _learner("recurrent_kif", deterministic=True)
        fresh.cfg.train.checkpoint_every = 2
        fresh.train_task("t0", past)
        res = fresh.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt, task_kind=kind)
        assert res.resumed_from > 0 and res.lr_scale == (0.5 if kind == "generation" else 1.0)
        return fresh

    a = run(None, tmp_path / "a")
    b = run(4, tmp_path / "b")  # stop inside the first round (after the inner loop started)
    c = run(7, tmp_path / "c")  # stop after a fusion, in the second round
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n]), n
        assert torch.equal(a.params[n], c.params[n]), n
    if kind is not None:  # the factor took effect: the same run at the label rate ends elsewhere
        labels = run(None, tmp_path / "d", kind=None)
        assert any(not torch.equal(a.params[n], labels.params[n]) for n in a.params)


def test_a_checkpoint_from_another_start_or_config_is_set_aside(tmp_path, caplog):
    """A job stopped mid-task resumes only from a checkpoint of the same start and config:
    after a rollback or a retry the job starts from another model (its checkpoint would carry
    the old model's tasks under the new one's name), and after a config change (the OOM hint's
    smaller batch) the old schedule no longer fits. Either way the task trains from its start,
    as an uninterrupted run from the new start does, instead of failing on every try."""
    import shutil

    from edgekif.errors import Interrupted

    past, other, new = _task("t0"), _task("tX"), _task("t1")
    ckpt = tmp_path / "ckpt"

    def learner(*tasks):
        lr = _learner("recurrent_kif", deterministic=True)
        lr.cfg.train.checkpoint_every = 2
        for t in tasks:
            lr.train_task(t[0].id.split("_")[0], t)
        return lr

    stopped = learner(past, other)  # live: a model that also learned tX
    calls = {"n": 0}
    with pytest.raises(Interrupted):
        stopped.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt,
                           should_stop=lambda: calls.__setitem__("n", calls["n"] + 1) or calls["n"] > 4)
    assert (ckpt / "state.json").is_file()

    rolled_back = learner(past)  # the restart finds tX rolled back: it starts from t0's model
    res = rolled_back.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt)
    assert res.resumed_from == 0 and "checkpoint set aside: its origin is" in caplog.text
    clean = learner(past)
    clean.train_task("t1", new, replay=lambda n, seed: past[:n])
    assert all(torch.equal(rolled_back.params[n], clean.params[n]) for n in clean.params)

    def by_epochs(lr):  # the schedule follows the batch size, as at the defaults
        lr.cfg.train.max_steps, lr.cfg.train.epochs, lr.cfg.train.min_steps = 0, 2.0, 0
        return lr

    shutil.rmtree(ckpt)
    with pytest.raises(Interrupted):  # the same start again, then a smaller batch after an OOM
        calls["n"] = 0
        by_epochs(learner(past)).train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt,
                                            should_stop=lambda: calls.__setitem__("n", calls["n"] + 1) or calls["n"] > 4)
    smaller = learner(past)
    smaller.cfg.train.batch_size = 2
    smaller = by_epochs(smaller)
    res = smaller.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt)
    assert res.resumed_from == 0 and "checkpoint set aside: its schedule is" in caplog.text


def test_learner_state_roundtrip(tmp_path):
    learner = _learner("recurrent_kif")
    learner.train_task("t0", _task("t0"))
    learner.save(tmp_path / "state")
    other = _learner("recurrent_kif")
    other.load_state(tmp_path / "state")
    assert other.tasks_seen == ["t0"]
    for n in learner.params:
        assert torch.equal(learner.params[n], other.params[n])
        assert torch.equal(learner.strategy.inner.sensitivity[n], other.strategy.inner.sensitivity[n])
    from peft import PeftModel

    base, _ = tiny_llama(seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "state" / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, learner.model(ids).logits, atol=1e-5)


def test_target_loss_equals_full_loss(tiny):
    from edgekif.inputs import collate, encode_example
    from edgekif.trainer import target_loss

    model, tok = tiny
    recs = _task("t0", 4)
    batch = collate([encode_example(tok, r, 64) for r in recs], tok.pad_token_id)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(target_loss(model, batch), full, atol=1e-5)


def test_target_loss_per_example_weighs_each_example_alike(tiny):
    """average="example": each example's mean loss over its own answer tokens, then the mean
    over examples, computed here from the full forward's logits; it differs from the token
    mean when answers differ in length (a one-word label beside a long free-text answer)."""
    import torch.nn.functional as F

    from edgekif.inputs import collate, encode_example
    from edgekif.trainer import target_loss

    model, tok = tiny
    recs = [Record.from_prompt("label?", "red"), Record.from_prompt("headline?", "a much longer answer of many words " * 3)]
    batch = collate([encode_example(tok, r, 96) for r in recs], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    per_row = []
    for row in range(len(recs)):
        keep = targets[row] != -100
        per_row.append(F.cross_entropy(logits[row][keep], targets[row][keep]))
    counts = (targets != -100).sum(dim=1).tolist()
    assert counts[0] * 3 < counts[1]  # the two answers' lengths differ a lot
    want = torch.stack(per_row).mean()
    assert torch.allclose(target_loss(model, batch, "example"), want, atol=1e-5)
    token_mean = (per_row[0] * counts[0] + per_row[1] * counts[1]) / sum(counts)
    assert torch.allclose(target_loss(model, batch, "token"), token_mean, atol=1e-5)
    assert not torch.allclose(want, token_mean, atol=1e-3)


def test_bf16_compute_dtype_trains_under_autocast_and_keeps_fp32_state():
    """train.compute_dtype = "bf16": the forward runs under autocast (the loss differs from
    fp32's by bf16's rounding, not more), and the LoRA weights, their importance and the
    optimizer's moments stay fp32."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        learner = _learner("recurrent_kif", compute_dtype=dtype)
        losses: list[float] = []
        learner.train_task("t0", _task("t0"), progress=lambda ev: losses.append(ev["loss"]))
        runs[dtype] = (learner, losses)
    bf16 = runs["bf16"][0]
    first32, first16 = runs["fp32"][1][0], runs["bf16"][1][0]  # before any update: same weights
    assert first16 != first32  # autocast changed the arithmetic
    assert abs(first16 - first32) < 0.02 * abs(first32)  # by rounding only: same model, same batch
    assert all(p.dtype == torch.float32 for p in bf16.params.values())
    assert all(t.dtype == torch.float32 for t in bf16.strategy.inner.sensitivity.values())
    opt = bf16.strategy.optimizer(TASK)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in bf16.params.values())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_warns_where_bf16_is_emulated(monkeypatch, caplog, native):
    import edgekif.trainer

    monkeypatch.setattr(edgekif.trainer, "fast_bf16", lambda device_type="cpu": native)
    with caplog.at_level("WARNING", logger="edgekif.trainer"):
        _learner("recurrent_kif", compute_dtype="bf16")
        _learner("recurrent_kif")  # fp32 never warns
    warned = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


def test_a_checkpoint_damaged_on_disk_is_set_aside(tmp_path, caplog):
    """Checkpoints are written whole (temp folder, fsync, rename), so a kill -9 leaves the last
    one; a disk that lost part of it leaves a tensors file safetensors cannot read, which raised
    its own error (not a ValueError) and failed the job on every try. The task trains from its
    start instead."""
    from edgekif.errors import Interrupted

    past, new = _task("t0"), _task("t1")
    ckpt = tmp_path / "ckpt"
    learner = _learner("recurrent_kif", deterministic=True)
    learner.cfg.train.checkpoint_every = 2
    learner.train_task("t0", past)
    calls = {"n": 0}
    with pytest.raises(Interrupted):
        learner.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt,
                           should_stop=lambda: calls.__setitem__("n", calls["n"] + 1) or calls["n"] > 4)
    tensors = [p for p in ckpt.iterdir() if p.suffix == ".safetensors"]
    assert tensors
    tensors[0].write_bytes(b"\x00" * 17)
    fresh = _learner("recurrent_kif", deterministic=True)
    fresh.train_task("t0", past)
    res = fresh.train_task("t1", new, replay=lambda n, seed: past[:n], ckpt_dir=ckpt)
    assert res.resumed_from == 0 and "checkpoint set aside: it is unreadable" in caplog.text
