"""The training loop: one plain loop for every strategy, with atomic checkpoint/resume.

    learner = Learner.create(cfg, model_with_lora, tokenizer)      # then learner.load_state(dir) to continue one
    result  = learner.train_task("agnews", records, replay=sample_fn, ckpt_dir=...)
    learner.save(dir)                                              # adapter + strategy state

`train_task` reads top to bottom: build the step schedule, then for each step draw a batch
(new task or replay buffer, as the strategy's schedule says), compute the loss only at the
answer tokens, backward, clip, let the strategy see the gradients, step the strategy's
optimizer, let the strategy act (Recurrent-KIF fuses here), checkpoint when due.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .atomic import atomic_dir, atomic_write_json
from .compute import compute_dtype, device_of, fast_bf16
from .config import Config
from .inputs import collate, encode_example
from .metrics import GENERATION
from .errors import CheckpointError, Interrupted, TrainingError
from .model import lora_parameters
from .records import Record
from .schedule import Deadline, can_stop_before, lr_multiplier
from .schedule import task_steps as policy_steps
from .strategies import REPLAY, TASK, make_strategy
from .strategies.base import Strategy

log = logging.getLogger(__name__)

ReplaySampler = Callable[[int, int], Sequence[Record]]  # (n, seed) -> records of PAST tasks only
ProgressFn = Callable[[dict], None]



def learner_adapter(learner_dir: str | os.PathLike) -> Path:
    """The peft adapter inside a folder written by Learner.save."""
    return Path(learner_dir) / "adapter"


@dataclass
class TrainStats:
    task_id: str
    strategy: str
    steps: int  # gradient steps taken (task + replay)
    task_steps: int
    replay_steps: int
    examples: int  # examples seen in gradient steps
    seconds: float
    mean_loss: float
    last_loss: float
    fusions: int = 0
    resumed_from: int = 0
    state_bytes: dict = field(default_factory=dict)
    planned_steps: int = 0  # the schedule's length; > steps when training stopped early
    stopped: str = ""  # why training ended before the schedule did: "" or "time_budget"
    lr_scale: float = 1.0  # the task kind's factor on the configured rates (lr_scale_for)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_scale_for(cfg: Config, kind: str | None) -> float:
    """The factor on train.lr and kif.outer_lr for a task of this kind (None: unknown, or a
    union of kinds): train.generation_lr_scale for free text, 1 otherwise."""
    return cfg.train.generation_lr_scale if kind == GENERATION else 1.0


# --------------------------------------------------------------------------- loss


def target_loss(model, batch: dict[str, torch.Tensor], average: str = "token") -> torch.Tensor:
    """Cross-entropy at answer tokens only.

    Runs the decoder for hidden states, gathers the positions whose next token is a label,
    and applies the LM head to those rows only: on a 49k-token vocabulary this skips almost
    all of the logits work (and memory) that a full forward would do.

    average (train.loss_average): "token" = the mean over the batch's answer tokens (as
    transformers computes it), so an example weighs by its answer's length; "example" = each
    example's own mean, then the mean over examples, so a 2-token label weighs as much as a
    15-token headline in a batch that mixes them (joint or replay batches of mixed tasks).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    sel = targets != -100
    if not bool(sel.any()):
        raise TrainingError("batch has no answer tokens (all labels masked)")
    logits = head(hidden[:, :-1][sel])
    if average == "token":
        return F.cross_entropy(logits.float(), targets[sel])
    per_token = F.cross_entropy(logits.float(), targets[sel], reduction="none")
    rows = sel.nonzero(as_tuple=True)[0]
    counts = sel.sum(dim=1)
    per_example = torch.zeros(sel.shape[0], dtype=per_token.dtype, device=per_token.device).index_add_(0, rows, per_token)
    answered = counts > 0
    return (per_example[answered] / counts[answered]).mean()


# --------------------------------------------------------------------------- data order


def _task_order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """Indices for `steps` batches: concatenated seeded permutations (epochs) of range(n)."""
    need = steps * batch_size
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(n, generator=g).tolist()
    return order[:need]


def _mix_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


# --------------------------------------------------------------------------- checkpoints

CKPT_TENSORS = "state.safetensors"
CKPT_META = "state.json"


def _optimizer_to_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{name}.{idx}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    prefix = f"opt.{name}."
    for key, t in tensors.items():
        if key.startswith(prefix):
            idx, k = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[k] = t
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, *, params: dict[str, torch.nn.Parameter], strategy: Strategy, meta: dict) -> None:
    """Adapter + optimizers + strategy state + RNG + step, as safetensors + JSON, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {f"lora.{n}": p.detach().clone().contiguous() for n, p in params.items()}
    opt_meta = {}
    for name, opt in strategy.optimizers.items():
        t, m = _optimizer_to_tensors(name, opt)
        tensors.update(t)
        opt_meta[name] = m
    tensors.update({f"strategy.{k}": v.detach().clone().contiguous() for k, v in strategy.checkpoint_state().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / CKPT_TENSORS))
        atomic_write_json(tmp / CKPT_META, {**meta, "optimizers": opt_meta, "python_random": _py_rng_state()})


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a checkpoint, without touching any state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return json.loads((path / CKPT_META).read_text()), load_file(str(path / CKPT_TENSORS))
    except (OSError, ValueError, SafetensorError) as e:  # a file a kill or a lost disk cut short: not ValueErrors
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from e


def checkpoint_misfit(meta: dict, tensors: dict[str, torch.Tensor], *, params: dict[str, torch.nn.Parameter],
                      strategy: Strategy, expected: dict) -> str | None:
    """Why this checkpoint cannot resume this run, or None. `expected` is the meta a checkpoint
    of this run records (task, schedule length, origin). Checked before anything is loaded: a
    checkpoint from another starting model (a rollback, a retry after a newer publish) or
    another config (batch size, LoRA placement) must not leak into, or half-overwrite, the run."""
    for key, want in expected.items():
        if meta.get(key) != want:
            return f"its {key} is {meta.get(key)!r}, this run's {want!r}"
    saved = {k[len("lora."):]: t.shape for k, t in tensors.items() if k.startswith("lora.")}
    if saved != {n: p.shape for n, p in params.items()}:
        return "its adapter tensors are not this model's (LoRA placement or rank changed)"
    opts = meta.get("optimizers") or {}
    if set(opts) != set(strategy.optimizers):
        return f"its optimizers are {sorted(opts)}, this run's {sorted(strategy.optimizers)}"
    for name, opt in strategy.optimizers.items():
        groups = opts[name].get("param_groups") or []
        if [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
            return f"its optimizer {name!r} holds other parameters"
    return None


def run_origin(params: dict[str, torch.nn.Parameter], tasks_seen: Sequence[str]) -> str:
    """What a task's training starts from: the tasks the learner has seen and a hash of its
    adapter weights before the first step."""
    import hashlib

    h = hashlib.sha256(json.dumps(list(tasks_seen)).encode())
    for n in sorted(params):
        h.update(n.encode())
        h.update(params[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_checkpoint(meta: dict, tensors: dict[str, torch.Tensor], *, params: dict[str, torch.nn.Parameter], strategy: Strategy) -> None:
    """Put a checkpoint read by read_checkpoint, that checkpoint_misfit found to fit, into the run."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"lora.{n}"])
    for name, opt in strategy.optimizers.items():
        _optimizer_from_tensors(name, opt, tensors, meta["optimizers"][name])
    strategy.load_state({k[len("strategy.") :]: v for k, v in tensors.items() if k.startswith("strategy.")})
    torch.set_rng_state(tensors["rng.torch"])
    _set_py_rng_state(meta.get("python_random"))


def _py_rng_state() -> list:
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _set_py_rng_state(s) -> None:
    if s:
        random.setstate((s[0], tuple(s[1]), s[2]))


# --------------------------------------------------------------------------- the learner


class Learner:
    """A model with LoRA plus the strategy state that must live across tasks."""

    def __init__(self, cfg: Config, model, tokenizer, strategy: Strategy, tasks_seen: list[str] | None = None):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.params = lora_parameters(model)
        if not self.params:
            raise TrainingError("the model has no trainable LoRA parameters (call edgekif.model.add_lora first)")
        self.strategy.setup(self.params)
        device = device_of(model).type
        if cfg.train.compute_dtype == "bf16" and not fast_bf16(device):
            # correct but slow: torch emulates bf16 matmuls where the hardware lacks them
            log.warning("train.compute_dtype = bf16 on a device without native bf16: training will be slower than fp32",
                        extra={"device": device})
        self.tasks_seen: list[str] = list(tasks_seen or [])
        # task -> the answer budget its evaluation reserves when it fits prompts (eval
        # max_prompt_tokens); training then reserves the same, so a long prompt is cut in the
        # same place in both (edgekif.inputs.encode_example). Empty: reserve the answer's length.
        self.answer_budgets: dict[str, int] = {}
        # () -> the base's own answers to general prompts, mixed into replay batches at
        # replay.general_share (edgekif.rehearsal; set by workflow.open_learner). Called only
        # when a task has past tasks to replay: a first job never pays for answering them.
        self.rehearsal_source: Callable[[], Sequence[Record]] | None = None

    @classmethod
    def create(cls, cfg: Config, model, tokenizer, strategy: str | None = None) -> "Learner":
        return cls(cfg, model, tokenizer, make_strategy(strategy or cfg.train.strategy, cfg))

    # -- the loop ---------------------------------------------------------------------------
    def train_task(
        self,
        task_id: str,
        records: Sequence[Record],
        *,
        replay: ReplaySampler | None = None,
        ckpt_dir: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressFn | None = None,
        max_steps: int | None = None,
        task_kind: str | None = None,
    ) -> TrainStats:
        """Train the learner on one task. `max_steps` overrides train.max_steps (the
        continual loop gives joint training the budget of all its tasks); `task_kind`
        (edgekif.tasks' kind of the task) scales the rates (lr_scale_for)."""
        cfg, tcfg = self.cfg, self.cfg.train
        if not records:
            raise TrainingError(f"task {task_id!r} has no records")
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True)
        task_index = len(self.tasks_seen)
        B = tcfg.batch_size
        budgets = self.answer_budgets  # a record's own task first: joint training's union mixes tasks
        encoded = [encode_example(self.tokenizer, r, cfg.data.max_length, answer_budget=budgets.get(r.meta.get("task_id", task_id), 0)) for r in records]
        fixed = tcfg.max_steps if max_steps is None else max_steps
        # exact when fixed; else epochs with a floor and a cap (edgekif.schedule.task_steps)
        task_steps = fixed or policy_steps(len(encoded), B, tcfg.epochs, tcfg.min_steps, tcfg.steps_cap)
        has_replay = replay is not None and self.strategy.uses_replay and len(replay(1, 0)) > 0
        kinds = self.strategy.schedule(task_steps, has_replay)
        order = _task_order(len(encoded), task_steps, B, _mix_seed(tcfg.seed, task_index))
        pad_id = self.tokenizer.pad_token_id
        device = self.model.get_input_embeddings().weight.device  # batches go where the model is (CUDA)

        # Fresh optimizers per task; a resume then loads their state from the checkpoint.
        self.strategy.begin_task(task_index)
        # Base rates of the fresh optimizers (times the kind's factor), before a checkpoint
        # loads scheduled ones.
        scale = lr_scale_for(cfg, task_kind)
        base_lrs = {name: [g["lr"] * scale for g in opt.param_groups] for name, opt in self.strategy.optimizers.items()}
        deadline = Deadline(tcfg.max_minutes)  # this call's budget: a resumed job gets a fresh one
        ckpt = Path(ckpt_dir) if ckpt_dir else None
        run = {"task_id": task_id, "schedule": len(kinds), "origin": run_origin(self.params, self.tasks_seen) if ckpt else None}
        start, losses = self._resume(ckpt, run)
        resumed_from = start
        self.model.train()

        def checkpoint(step: int) -> None:
            if ckpt is not None:
                save_checkpoint(ckpt, params=self.params, strategy=self.strategy, meta={**run, "step": step, "losses": losses})

        t0 = time.perf_counter()
        task_step = sum(1 for k in kinds[:start] if k == TASK)
        examples = 0
        end, stopped = len(kinds), ""
        for step in range(start, len(kinds)):
            if should_stop is not None and should_stop():
                checkpoint(step)
                raise Interrupted(f"training of {task_id!r} stopped at step {step}/{len(kinds)} (checkpoint saved)")
            if step > start and can_stop_before(kinds, step) and deadline.expired():
                end, stopped = step, "time_budget"
                if kinds[step - 1] == TASK:
                    self.strategy.after_step(TASK, None)  # close the task as its last step would
                log.info("training stopped on its time budget", extra={"task": task_id, "step": step, "of": len(kinds), "max_minutes": tcfg.max_minutes})
                break
            kind = kinds[step]
            prev_kind = kinds[step - 1] if step > 0 else None
            next_kind = kinds[step + 1] if step + 1 < len(kinds) else None

            if kind == TASK:
                batch_items = [encoded[i] for i in order[task_step * B : (task_step + 1) * B]]
                task_step += 1
            else:
                recs = replay(self.strategy.config.replay_batch_size, _mix_seed(tcfg.seed, task_index, step))
                batch_items = [encode_example(self.tokenizer, r, cfg.data.max_length, answer_budget=self.answer_budgets.get(r.meta.get("task_id", ""), 0))
                               for r in recs]
            batch = {k: v.to(device) for k, v in collate(batch_items, pad_id).items()}

            mult = lr_multiplier(step, len(kinds), tcfg.warmup_ratio, tcfg.min_lr_ratio, tcfg.lr_decay)
            for name, opt in self.strategy.optimizers.items():
                for group, base_lr in zip(opt.param_groups, base_lrs[name]):
                    group["lr"] = base_lr * mult
            loss, boundary = self._step(kind, prev_kind, next_kind, batch)

            losses.append(round(loss.item(), 6))
            examples += len(batch_items)
            if progress is not None:
                progress({"task": task_id, "step": step + 1, "steps": len(kinds), "kind": kind, "loss": losses[-1]})
            every = tcfg.checkpoint_every
            if next_kind is not None and (boundary or (every and (step + 1) % every == 0)):
                checkpoint(step + 1)

        self.model.eval()
        self.tasks_seen.append(task_id)
        done = kinds[:end]
        task_losses = [l for l, k in zip(losses, done) if k == TASK]
        return TrainStats(
            task_id=task_id,
            strategy=self.strategy.name,
            steps=len(done),
            task_steps=done.count(TASK),
            replay_steps=done.count(REPLAY),
            examples=examples,
            seconds=time.perf_counter() - t0,
            mean_loss=sum(task_losses) / max(1, len(task_losses)),
            last_loss=task_losses[-1] if task_losses else math.nan,
            fusions=self.strategy.fusions,
            resumed_from=resumed_from,
            state_bytes=self.strategy.state_nbytes(),
            planned_steps=len(kinds),
            stopped=stopped,
            lr_scale=scale,
        )

    def _step(self, kind: str, prev_kind: str | None, next_kind: str | None, batch: dict) -> tuple[torch.Tensor, bool]:
        """One optimizer step, with the strategy's hooks around it; True at a boundary worth
        checkpointing (e.g. right after a fusion)."""
        self.strategy.before_step(kind, prev_kind)
        with compute_dtype(self.model, self.cfg.train.compute_dtype):
            loss = target_loss(self.model, batch, self.cfg.train.loss_average)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.train.grad_clip)
        self.strategy.after_backward(kind)
        opt = self.strategy.optimizer(kind)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, self.strategy.after_step(kind, next_kind)

    def _resume(self, ckpt: Path | None, run: dict) -> tuple[int, list[float]]:
        """The step to start at and the losses so far: from the task's checkpoint if it is this
        run's (`run`: task, schedule length, origin), else from the start. A checkpoint is only a
        resume aid: one that does not fit is set aside with a log line, never an error that would
        fail the job on every try."""
        if ckpt is None or not (ckpt / CKPT_META).is_file():
            return 0, []
        try:
            loaded = read_checkpoint(ckpt)
            misfit = checkpoint_misfit(*loaded, params=self.params, strategy=self.strategy, expected=run)
        except (CheckpointError, KeyError, TypeError, AttributeError) as e:
            misfit = f"it is unreadable ({e})"
        if misfit is not None:
            log.warning("checkpoint set aside: %s; training the task from its start", misfit,
                        extra={"task": run["task_id"], "checkpoint": str(ckpt)})
            return 0, []
        meta, tensors = loaded
        load_checkpoint(meta, tensors, params=self.params, strategy=self.strategy)
        log.info("resumed training", extra={"task": run["task_id"], "step": int(meta["step"]), "of": run["schedule"]})
        return int(meta["step"]), list(meta.get("losses", []))

    # -- persistence across tasks (daemon jobs) ---------------------------------------------
    def save(self, folder: Path) -> Path:
        """Adapter in peft's format (loads with PeftModel.from_pretrained) + the strategy's
        persistent state + learner.json."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_dir(folder, overwrite=True) as tmp:
            self.model.save_pretrained(learner_adapter(tmp))
            state = {k: v.detach().clone().contiguous() for k, v in self.strategy.persistent_state().items()}
            if state:
                save_file(state, str(tmp / STRATEGY_STATE))
            write_learner_meta(tmp, LearnerMeta(strategy=self.strategy.name, tasks_seen=list(self.tasks_seen)))
        return folder

    def load_state(self, folder: Path) -> None:
        """Load adapter weights + strategy state saved by `save` into this learner."""
        from peft import set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = read_learner_meta(folder)
        try:
            weights = load_file(str(learner_adapter(folder) / "adapter_model.safetensors"))
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{folder}: unreadable learner state: {e}") from e
        set_peft_model_state_dict(self.model, weights)
        st = folder / STRATEGY_STATE
        if st.is_file() and meta.strategy == self.strategy.name:
            try:
                self.strategy.load_state(load_file(str(st)))
            except KeyError:
                log.warning("strategy state does not match; starting importance from zero", extra={"folder": str(folder)})
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{folder}: unreadable learner state: {e}") from e
        self.tasks_seen = list(meta.tasks_seen)


# --------------------------------------------------------------------------- learner folder

LEARNER_META = "learner.json"
STRATEGY_STATE = "strategy_state.safetensors"


@dataclass
class LearnerMeta:
    """learner.json: which strategy wrote the folder and the tasks it has learned, in order."""

    strategy: str
    tasks_seen: list[str]


def has_learner(folder: Path) -> bool:
    return (Path(folder) / LEARNER_META).is_file()


def read_learner_meta(folder: Path) -> LearnerMeta:
    path = Path(folder) / LEARNER_META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return LearnerMeta(strategy=str(raw["strategy"]), tasks_seen=[str(t) for t in raw.get("tasks_seen", [])])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable learner metadata: {e}") from e


def write_learner_meta(folder: Path, meta: LearnerMeta) -> None:
    atomic_write_json(Path(folder) / LEARNER_META, asdict(meta))
