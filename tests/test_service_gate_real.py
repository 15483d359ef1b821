"""The forgetting gate with the real library stages (service.edgekif_stages.LibraryStages):
real validation, holdout split, replay buffer, Recurrent-KIF training, ONNX export, exact
match measured on the export, and publishing, on a tiny random Llama.

Three tasks go through the daemon one after the other:
  colors    8 prompts, each with its own label (ant/bee/cow/dog), learnt to 100% -> v0001
  shuffled  the same prompts with every label rotated: harmful by construction. Learning it
            wipes out `colors`, so the gate must hold it and `current` stays on v0001.
  animals   8 other prompts in another format with other labels: a good task -> v0002,
            built on colors' learner (the held job leaks neither weights nor replay data).

Why the base is wider than the conftest `tiny_dir` (hidden 64): with tied embeddings at the
HF init (std 0.02) and the final RMSNorm at 1, a logit is at most about 0.02 * hidden, so
hidden=64 caps every logit near 1.3 and the model can barely prefer one label over
another whatever the training. hidden=512 lifts that cap to ~10; 100 steps then learn
`colors` with label margins of 5-7 nats (measured), in a few seconds on one CPU thread.
Labels all have three letters: label scoring sums log-probabilities, which would otherwise
favour the shortest label while the model is still unsure.

Measured with base seeds 0-4 (seed 0 is the test), when every copy of a prompt was the same
record: colors 1.0 after its job, 0.0 after shuffled (shuffled itself 1.0), still 1.0 after
animals (animals 0.75-1.0). Since the holdout split keeps a repeated prompt on one side, each
copy comes under its own system message and the holdout asks copies not trained on; with 6
copies colors ended animals' job at 0.67 (4 of 12 records lost, 2 short of a significant loss),
with 10 copies seed 0 gives colors 0.9, then 0.0 after shuffled (shuffled 1.0), 0.85 after
animals (animals 0.95). With 40 steps instead of 80 for the
later tasks, Recurrent-KIF's fusion left animals unlearnt on one seed; before the replay fix
in edgekif_stages.train, animals' outer loop also replayed the held task's examples.
~35-65 s on a busy 2-core box.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgekif.config import load_config  # noqa: E402
from service.daemon import Daemon  # noqa: E402
from service.status import status  # noqa: E402
from edgekif.layout import DataLayout
from service.jobs import JobStore  # noqa: E402

COLORS = {"apple": "ant", "brick": "bee", "cloud": "cow", "dingo": "dog",
          "eagle": "ant", "flute": "bee", "grape": "cow", "house": "dog"}
ROTATE = {"ant": "bee", "bee": "cow", "cow": "dog", "dog": "ant"}
SHUFFLED = {word: ROTATE[label] for word, label in COLORS.items()}  # every label changes
ANIMALS = {"iron": "fox", "jelly": "hen", "kite": "owl", "lemon": "pig",
           "mango": "fox", "night": "hen", "ocean": "owl", "piano": "pig"}
COPIES = 10  # 80 records: holdout 25% = 20 (variants of trained prompts), 60 to train on
THRESHOLD = 5.0  # service.forgetting_threshold, the default (asserted below)


def task_file(mapping: dict[str, str], fmt: str) -> str:
    # each copy under its own system message: the same messages twice would stay on one side
    # of the holdout split, and a tiny random model learns the prompts it was shown, not a rule
    # it could carry to new ones; the tokens next to the answer stay each task's own
    return "".join(json.dumps({"system": f"Copy {k + 1}.", "prompt": fmt.format(w), "completion": label}) + "\n"
                   for k in range(COPIES) for w, label in mapping.items())


@pytest.fixture(scope="module")
def wide_tiny_dir(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("wide-tiny") / "base", seed=0, hidden=512)


@pytest.fixture()
def one_torch_thread():
    """model.threads=1 (deterministic numbers) calls torch.set_num_threads; give it back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_gate_holds_a_harmful_task_and_publishes_a_good_one(tmp_path, wide_tiny_dir, one_torch_thread, monkeypatch):
    from edgekif.export.manifest import read_manifest
    from edgekif.publish import ModelStore
    from edgekif.replay import ReplayBuffer
    from service.edgekif_stages import LibraryStages

    data = tmp_path / "data"
    layout = DataLayout(data)
    layout.create()

    replayed: dict[str, set[str]] = {}  # task being trained -> tasks its outer loop sampled
    training: list[str] = []
    real_sample = ReplayBuffer.sample

    def spy_sample(self, n, seed, task_ids=None):
        replayed.setdefault(training[-1], set()).update(task_ids or ["<all>"])
        return real_sample(self, n, seed, task_ids=task_ids)

    monkeypatch.setattr(ReplayBuffer, "sample", spy_sample)

    def run_job(name: str, text: str, steps: int):
        config = load_config(None, [
            f"data_dir={data}", "service.quiet_seconds=0",
            f"model.base={wide_tiny_dir}", "model.precision=fp32", "model.device=cpu", "model.threads=1",
            "train.lr=3e-3", f"train.max_steps={steps}", "service.holdout_fraction=0.25", "train.deterministic=true",
            "train.warmup_ratio=0", "train.min_lr_ratio=1",  # a constant rate, as the step counts above were measured with
            # and the paper's rounds, which they were measured with too: at the default Q=2/M=1
            # (chosen on the real benchmark) this toy's colors ends animals' job at 0.67, not 1.0
            "kif.inner_steps=8", "kif.outer_steps=4",
            # and LoRA on q,v, the default they were measured with: on every linear layer (the
            # default since 2026-12-06) 100 steps at this rate leave colors below significance
            # on its 12 held-out records (p = 0.0625)
            "lora.target_modules=q_proj,v_proj",
            "export.target=onnx", "export.precision=fp32",
            # a tiny random model's general answers are noise, so the general-ability bounds are
            # off here (test_zero_shot and test_service_gates_paired hold a drifted model); the
            # export stage still measures the figures and the gate still reads them
            "general_ability.min_rouge_l=0", "general_ability.max_loglik_drop=0",
        ])
        training.append(Path(name).stem)
        (layout.inbox / name).write_text(text)
        d = Daemon(config, LibraryStages(config), retry_base_seconds=0)
        try:
            d.run_until_idle()
        finally:
            d.close()
        with JobStore(layout.state_db) as store:
            return store.jobs()[-1], config

    store = ModelStore(data)

    # 1. colors: learnt, published as v0001.
    a, config = run_job("colors.jsonl", task_file(COLORS, "What is {}?"), steps=100)
    assert config.service.forgetting_threshold == THRESHOLD
    assert (a.file_name, a.state, a.version) == ("colors.jsonl", "published", "v0001"), a.error
    assert a.metrics["buffer"]["holdout_examples"] == 20 and a.metrics["buffer"]["details"]["train_examples"] == 60
    assert not (data / "jobs" / str(a.id) / "checkpoint").exists()  # only a resume needs it; the learner holds the result
    assert a.metrics["validate"]["details"]["labels"] == ["ant", "bee", "cow", "dog"]
    trained = a.metrics["train"]["metrics"]
    assert trained["spec"]["kind"] == "classification" and trained["lr_scale"] == 1.0  # the task's kind reached training
    acc_a = a.metrics["evaluate"]["accuracies"]
    assert acc_a["colors"] >= 0.9, acc_a  # chance is 0.25; measured 1.0
    assert store.current() == "v0001"
    general = read_manifest(store.path("v0001")).general_ability
    assert general["n"] == general["prompts"] >= 60 and general["held"] is False and general["loglik_drop"] is None  # 0 = not checked
    assert a.metrics["gate"]["decisions"]["general ability"]["passed"] is True

    # 2. shuffled: learnt too (that is the harm), colors collapses, the gate holds it.
    b, _ = run_job("shuffled.jsonl", task_file(SHUFFLED, "What is {}?"), steps=80)
    acc_b = b.metrics["evaluate"]["accuracies"]
    assert b.state == "held", (b.state, acc_b, b.error)
    assert acc_b["shuffled"] >= 0.75 and acc_b["colors"] <= 0.25, acc_b  # measured 1.0 and 0.0
    gate = b.metrics["gate"]
    assert gate["ok"] is False and gate["published_version"] == "v0001"
    assert gate["published_accuracies"] == acc_a and gate["threshold_points"] == THRESHOLD
    drop = 100 * (acc_a["colors"] - acc_b["colors"])
    assert drop > THRESHOLD
    # the paired test on the 20 colors records, its statistic in the reason (issue 21)
    n = a.metrics["buffer"]["holdout_examples"]
    lost = round(n * (acc_a["colors"] - acc_b["colors"]))
    (reason,) = gate["reasons"]
    assert reason.startswith(f"colors: normalized_exact_match {100 * acc_b['colors']:.1f} vs live {100 * acc_a['colors']:.1f}, "
                             f"{100 * (acc_b['colors'] - acc_a['colors']):+.1f} points [95% CI ")
    assert reason.endswith(f"exact McNemar (0 vs {lost} discordant) p={2 * 0.5 ** lost:.3g}, n={n}: "
                           f"a significant loss of {drop:.1f} points > {THRESHOLD:g} allowed")
    decision = gate["decisions"]["colors vs live"]
    assert decision["method"].startswith("exact McNemar") and decision["passed"] is False and decision["n"] == n
    from edgekif.export.manifest import read_manifest

    assert read_manifest(layout.job_dir(b.id) / "export").gate["decisions"]["colors vs live"] == decision
    assert b.error["kind"] == "gate" and b.version is None
    assert "publish" not in b.metrics and (layout.job_dir(b.id) / "export" / "manifest.json").is_file()  # kept for publish --force
    assert store.current() == "v0001" and store.versions() == ["v0001"]

    # 3. animals: a good task, published on top of colors (not of the held shuffled job).
    c, config = run_job("animals.jsonl", task_file(ANIMALS, "Animal for {}:"), steps=80)
    acc_c = c.metrics["evaluate"]["accuracies"]
    assert (c.state, c.version) == ("published", "v0002"), (c.state, acc_c, c.error)
    assert set(acc_c) == {"colors", "animals"}  # the held task is not a past task
    assert acc_c["animals"] >= 0.75, acc_c  # measured 1.0
    # colors kept what it had: the held task, which wiped it out, leaked into animals' job neither
    # by weights nor by replay (measured 0.9 -> 0.85 on held-out copies under system messages it
    # was not trained with: 1 record of 20)
    assert acc_c["colors"] >= 0.7, acc_c
    assert c.metrics["gate"]["ok"] is True and c.metrics["gate"]["reasons"] == []
    assert store.current() == "v0002" and store.versions() == ["v0001", "v0002"]
    manifest = read_manifest(store.path("v0002")).to_dict()
    assert [t["name"] for t in manifest["tasks"]] == ["colors", "animals"]
    assert manifest["accuracies"] == acc_c and manifest["job_id"] == c.id

    # The held task's examples are in the buffer (it was buffered before training) but were
    # never replayed: the outer loop replays published tasks only.
    assert replayed == {"shuffled": {"colors"}, "animals": {"colors"}}, replayed
    st = status(config)
    assert set(st["buffer"]["tasks"]) == {"colors", "shuffled", "animals"}
    assert st["counts"] == {"published": 2, "held": 1}
    assert st["published"]["version"] == "v0002" and st["published"]["accuracies"] == acc_c
    assert [(p["id"], p["state"]) for p in st["problems"]] == [(b.id, "held")]
    assert os.path.realpath(layout.models / "current") == str((layout.models / "v0002").resolve())


@pytest.mark.slow
def test_a_first_task_that_does_not_beat_the_base_is_held(tmp_path, wide_tiny_dir, one_torch_thread):
    """One training step at a negligible rate leaves the model as the base was: its exact match
    on the holdout (measured on the export) does not beat the base's zero-shot (measured on an
    export of the base, same setting), so even a first model is held, with the reason; the
    base's figure is cached for the next job."""
    from edgekif.publish import ModelStore
    from service.edgekif_stages import LibraryStages

    data = tmp_path / "data"
    cache = tmp_path / "cache"
    layout = DataLayout(data)
    layout.create()
    config = load_config(None, [
        f"data_dir={data}", "service.quiet_seconds=0",
        f"model.base={wide_tiny_dir}", "model.precision=fp32", "model.device=cpu", "model.threads=1",
        "train.lr=1e-7", "train.max_steps=1", "service.holdout_fraction=0.25", "train.deterministic=true",
        "export.target=onnx", "export.precision=fp32",
    ])
    (layout.inbox / "colors.jsonl").write_text(task_file(COLORS, "What is {}?"))
    os.environ["EDGEKIF_CACHE_DIR"] = str(cache)
    try:
        d = Daemon(config, LibraryStages(config), retry_base_seconds=0)
        try:
            d.run_until_idle()
        finally:
            d.close()
    finally:
        del os.environ["EDGEKIF_CACHE_DIR"]
    with JobStore(layout.state_db) as store:
        (job,) = store.jobs()
    gate = job.metrics["gate"]
    assert job.state == "held" and gate["ok"] is False, (job.state, job.error)
    after, base = job.metrics["evaluate"]["accuracies"]["colors"], gate["zero_shot"]["colors"]
    assert after - base < 0.01 and gate["published_version"] is None  # a first model: nothing to forget
    (reason,) = gate["reasons"]  # the paired test and its statistic (issue 21)
    assert reason.startswith("colors: normalized_exact_match ") and " vs base " in reason and "McNemar" in reason
    assert reason.endswith("not a significant gain over the base (p >= 0.05 or no gain; nothing learned to publish)")
    assert gate["decisions"]["colors vs base"]["passed"] is False
    assert gate["measured_by"]["runtime"].startswith("onnxruntime ") and gate["measured_by"]["metric"] == "exact_match"
    assert gate["measured_by"]["scores_metric"] == {"colors": "normalized_exact_match"}  # what the gate's scores are
    assert job.error["kind"] == "gate" and ModelStore(data).current() is None
    with JobStore(layout.state_db) as store:
        (held,) = store.events(job.id, ("held",))
    assert held.data["accuracies"] == {"colors": after} and held.data["zero_shot"] == {"colors": base}
    assert held.data["measured_by"].startswith("onnxruntime ") and held.data["reasons"] == gate["reasons"]
    (scores,) = cache.glob("zero-shot/*/*/scores.json")
    assert [v["task"] for v in json.loads(scores.read_text()).values()] == ["colors"]
