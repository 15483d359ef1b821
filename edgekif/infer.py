"""Local inference on an exported/published model folder (greedy decoding).

  GenaiRunner(folder)   onnxruntime-genai folder (target "genai"): KV cache, batched generation
  OnnxRunner(folder)    plain ONNX folder (target "onnx"): no KV cache, re-runs the full sequence
  open_model(folder)    the runner an export folder's target needs
  answer_all(runner, prompts, budget)   greedy answers to many prompts: after their shared
                                        prefix, or batched by length

Opening the published version (ROOT/models/current) is edgekif.publish.open_current: the
store knows its versions, the runners know only folders.

Prompts are a user message (str) or a list of {"role","content"} messages; the folder's chat
template is applied with add_generation_prompt, as at training time.

  runner.complete(prompt, budget, sampling=..., stops=..., on_text=...)   one answer with
      search options and stop strings, streamed as whole characters (edgekif.decoding): the API's path
Answers are whole UTF-8 characters: a partial character cut by the token limit is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from .decoding import GREEDY, DecodingError, Sampling, TextStream, decode_answer
from .errors import IntegrityError, ModelError
from .export.files import EXPORT_INFO, GENAI_CONFIG, ONNX_MODEL_FILE
from .export.manifest import Manifest, read_manifest
from .inputs import shared_prefix_length

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[dict[str, str]]]
StreamCallback = Callable[[str], None]


class ContextLengthError(ModelError):
    """The prompt leaves no room for an answer in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(f"the prompt takes {prompt_tokens} tokens; the model's context length is {context_length}")
        self.prompt_tokens, self.context_length = prompt_tokens, context_length


def _does_not_fit(prompt_tokens: int, context_length: int) -> ModelError:
    """The error of the batch and generate_ids callers (not the API's ContextLengthError) for a
    prompt that leaves no room for an answer in the context."""
    return ModelError(f"prompt of {prompt_tokens} tokens does not fit the context length {context_length}")


@dataclass
class Completion:
    """One generated answer: its text (whole characters, cut before a stop string), its token
    ids, the prompt's length and why it ended: "stop" (EOS or a stop string), "length"
    (max_new_tokens or the context) or "cancelled"."""

    text: str
    ids: list[int]
    prompt_tokens: int
    finish_reason: str


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None (an export being checked has none yet)."""
    try:
        return read_manifest(folder)
    except IntegrityError:
        return None


class GenaiRunner:
    """Greedy generation with onnxruntime-genai from a genai export folder."""

    def __init__(self, model_dir: str | os.PathLike, *, execution_provider: str | None = None) -> None:
        import onnxruntime_genai as og

        self.model_dir = Path(model_dir)
        self.version: str | None = None  # set by edgekif.publish.open_current
        self.manifest = _manifest(self.model_dir)
        if not (self.model_dir / GENAI_CONFIG).is_file():
            raise ModelError(f"{self.model_dir}: no {GENAI_CONFIG} (not an onnxruntime-genai model folder)")
        try:
            if execution_provider:  # override the provider written into genai_config.json
                config = og.Config(str(self.model_dir))
                config.clear_providers()
                if execution_provider != "cpu":
                    config.append_provider(execution_provider)
                self.model = og.Model(config)
            else:
                self.model = og.Model(str(self.model_dir))
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # onnxruntime-genai raises RuntimeError with the reason
            raise ModelError(f"{self.model_dir}: cannot load onnxruntime-genai model: {e}") from e
        self._og = og
        cfg = _read_json(self.model_dir / GENAI_CONFIG)
        self.context_length = int(cfg.get("model", {}).get("context_length") or 2048)
        # sliding-window layers (Gemma 2/3) get a KV cache of this many positions at least
        self.window_size = int((cfg.get("model", {}).get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0)
        self.eos_ids = set(int(t) for t in self.tokenizer.eos_token_ids)
        self._hf_tokenizer: Any = None

    def chat_text(self, prompt: Prompt) -> str:
        messages = _messages(prompt)
        try:
            return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception:  # template features the genai tokenizer lacks: use transformers' jinja
            if self._hf_tokenizer is None:
                from transformers import AutoTokenizer

                self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            return self._hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _params(self, prompt_len: int, max_new_tokens: int, batch_size: int = 1, sampling: Sampling = GREEDY) -> Any:
        params = self._og.GeneratorParams(self.model)
        max_length = min(prompt_len + max_new_tokens, self.context_length)
        if prompt_len >= max_length:
            raise _does_not_fit(prompt_len, self.context_length)
        # onnxruntime-genai sizes the windowed KV cache by max_length and refuses one smaller than
        # the window ("KV cache capacity (32) must be at least local_window_size (512)"); the
        # answer's length is still bounded by the callers' own max_new_tokens loops
        max_length = min(max(max_length, self.window_size), self.context_length)
        opts = sampling.search_options(self._vocab_size())
        params.set_search_options(max_length=max_length, batch_size=batch_size, **opts)
        return params

    def _vocab_size(self) -> int | None:
        # read lazily (only a top_k needs it): onnxruntime-genai checks top_k against it with a RuntimeError
        return _read_json(self.model_dir / GENAI_CONFIG).get("model", {}).get("vocab_size")

    def answer_text(self, ids: Sequence[int]) -> str:
        """An answer's text: whole characters only (edgekif.decoding)."""
        return decode_answer(self.tokenizer.decode, ids)

    def complete(self, prompt: Prompt, max_new_tokens: int = 64, *, sampling: Sampling = GREEDY, stops: Sequence[str] = (),
                 on_text: StreamCallback | None = None, cancel: Callable[[], bool] | None = None) -> Completion:
        """One answer, token by token: on_text(piece) gets its text as it grows (whole characters,
        never past a stop string), cancel() is asked after each token (a client gone)."""
        ids = self.tokenizer.encode(self.chat_text(prompt))
        n_prompt = len(ids)
        if n_prompt + 1 > self.context_length:
            raise ContextLengthError(n_prompt, self.context_length)
        gen = self._og.Generator(self.model, self._params(n_prompt, max_new_tokens, sampling=sampling))
        gen.append_tokens(ids)
        text = TextStream(self.tokenizer.decode, stops)
        finish = "length"
        while len(text.ids) < max_new_tokens:
            if gen.is_done():  # context length reached
                break
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in self.eos_ids:
                finish = "stop"
                break
            piece = text.push(token)
            if piece and on_text is not None:
                on_text(piece)
            if text.stopped:
                finish = "stop"
                break
            if cancel is not None and cancel():
                finish = "cancelled"
                break
        piece = text.finish()
        if piece and on_text is not None:
            on_text(piece)
        return Completion(text.text, text.ids, n_prompt, finish)

    def generate_ids(self, prompt: Prompt, max_new_tokens: int = 64, stream_callback: StreamCallback | None = None) -> list[int]:
        """Greedy answer as token ids (EOS not included)."""
        try:
            return self.complete(prompt, max_new_tokens, on_text=stream_callback).ids
        except ContextLengthError as e:  # the message callers of _params knew
            raise _does_not_fit(e.prompt_tokens, e.context_length) from None

    def generate(self, prompt: Prompt, max_new_tokens: int = 64, stream_callback: StreamCallback | None = None) -> str:
        return self.answer_text(self.generate_ids(prompt, max_new_tokens, stream_callback))

    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 64) -> list[str]:
        return [self.answer_text(o) for o in self.generate_batch_ids(prompts, max_new_tokens)]

    def answers_after_shared_prefix(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str] | None:
        """Greedy answers, one request at a time on one generator that reads the prompts'
        shared prefix once: each prompt's own tokens are appended after it, answered, and the
        generator rewound to the prefix (rewind_to). None when that does not pay here: the
        prefix is under SHARED_PREFIX_PER_ANSWER_TOKEN times the answer budget, a prompt and
        its answer could outgrow the context, the model has sliding-window layers, or the
        runtime cannot rewind."""
        seqs = [[int(t) for t in self.tokenizer.encode(self.chat_text(p))] for p in prompts]
        if len(seqs) < 2:
            return None
        shared = shared_prefix_length(seqs)
        longest = max(len(s) for s in seqs) + max_new_tokens
        if shared < SHARED_PREFIX_PER_ANSWER_TOKEN * max_new_tokens or longest > self.context_length:
            return None
        if self.window_size:
            # Gemma 3's int8 export gave last logits up to 0.8 apart (of ~20) after a rewound
            # prefix and in one pass on six dbpedia prompts well inside its window, where
            # SmolLM2's were identical to the bit: one request at a time, as clients send them
            return None
        import numpy as np

        gen = self._og.Generator(self.model, self._params(longest - max_new_tokens, max_new_tokens))
        if not hasattr(gen, "rewind_to"):  # onnxruntime-genai before 0.6
            return None
        answers = []
        try:
            gen.append_tokens(np.asarray(seqs[0][:shared], dtype=np.int32))
            for seq in seqs:
                gen.append_tokens(np.asarray(seq[shared:], dtype=np.int32))
                ids: list[int] = []
                while len(ids) < max_new_tokens and not gen.is_done():
                    gen.generate_next_token()
                    token = int(gen.get_next_tokens()[0])
                    if token in self.eos_ids:
                        break
                    ids.append(token)
                answers.append(self.answer_text(ids))
                gen.rewind_to(shared)
        except RuntimeError as e:  # a graph or runtime that cannot rewind: the callers' other paths
            log.warning("answering after a shared prefix refused by the runtime; answering whole prompts", extra={"error": str(e)[:300]})
            return None
        return answers

    def generate_batch_ids(self, prompts: Sequence[Prompt], max_new_tokens: int = 64) -> list[list[int]]:
        """One padded batch through the generator (onnxruntime-genai handles the padding)."""
        if not prompts:
            return []
        texts = [self.chat_text(p) for p in prompts]
        batch = self.tokenizer.encode_batch(texts)
        width = int(batch.shape()[1])
        gen = self._og.Generator(self.model, self._params(width, max_new_tokens, batch_size=len(texts)))
        gen.append_tokens(batch)
        outs: list[list[int]] = [[] for _ in texts]
        finished = [False] * len(texts)
        steps = 0
        while not gen.is_done() and steps < max_new_tokens and not all(finished):
            gen.generate_next_token()
            steps += 1
            for i, token in enumerate(gen.get_next_tokens()):
                if finished[i]:
                    continue
                if int(token) in self.eos_ids:
                    finished[i] = True
                else:
                    outs[i].append(int(token))
        return outs


class OnnxRunner:
    """Greedy generation from a plain ONNX export (no KV cache: fine for short answers)."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.version: str | None = None  # set by edgekif.publish.open_current
        self.manifest = _manifest(self.model_dir)
        try:
            self.session = ort.InferenceSession(str(self.model_dir / ONNX_MODEL_FILE), providers=["CPUExecutionProvider"])
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        except Exception as e:
            raise ModelError(f"{self.model_dir}: cannot load plain ONNX model: {e}") from e
        gen_cfg = _read_json(self.model_dir / "generation_config.json")
        eos = gen_cfg.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        # the bound GenaiRunner reads as genai_config.json's context_length (the genai builder
        # writes max_position_embeddings there); past it the graph answers garbage, not an error
        self.context_length = int(_read_json(self.model_dir / "config.json").get("max_position_embeddings") or 2048)

    def chat_ids(self, prompt: Prompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def answer_text(self, ids: Sequence[int]) -> str:
        """An answer's text: whole characters only (edgekif.decoding)."""
        return decode_answer(self._decode, ids)

    def complete(self, prompt: Prompt, max_new_tokens: int = 64, *, sampling: Sampling = GREEDY, stops: Sequence[str] = (),
                 on_text: StreamCallback | None = None, cancel: Callable[[], bool] | None = None) -> Completion:
        """As GenaiRunner.complete; greedy only (this target has no sampler: anything else is refused)."""
        if not sampling.is_default:
            param = "repetition_penalty" if sampling.greedy else "temperature"
            raise DecodingError("this version is a plain ONNX export: it decodes greedily, without sampling or penalties", param=param)
        prompt_ids = self.chat_ids(prompt)
        if len(prompt_ids) + 1 > self.context_length:
            raise ContextLengthError(len(prompt_ids), self.context_length)
        text = TextStream(self._decode, stops)
        state = {"finish": "length"}

        def on_token(token: int, eos: bool) -> bool:
            if eos:
                state["finish"] = "stop"
                return True
            piece = text.push(token)
            if piece and on_text is not None:
                on_text(piece)
            if text.stopped:
                state["finish"] = "stop"
                return True
            if cancel is not None and cancel():
                state["finish"] = "cancelled"
                return True
            return False

        self._greedy([prompt_ids], max_new_tokens, on_token)
        piece = text.finish()
        if piece and on_text is not None:
            on_text(piece)
        return Completion(text.text, text.ids, len(prompt_ids), state["finish"])

    def generate_ids(self, prompt: Prompt, max_new_tokens: int = 64, stream_callback: StreamCallback | None = None) -> list[int]:
        try:
            return self.complete(prompt, max_new_tokens, on_text=stream_callback).ids
        except ContextLengthError as e:  # as GenaiRunner.generate_ids
            raise _does_not_fit(e.prompt_tokens, e.context_length) from None

    def generate(self, prompt: Prompt, max_new_tokens: int = 64, stream_callback: StreamCallback | None = None) -> str:
        return self.answer_text(self.generate_ids(prompt, max_new_tokens, stream_callback))

    def generate_batch_ids(self, prompts: Sequence[Prompt], max_new_tokens: int = 64) -> list[list[int]]:
        if not prompts:
            return []
        seqs = [self.chat_ids(p) for p in prompts]
        for seq in seqs:
            if len(seq) + 1 > self.context_length:  # as GenaiRunner for a batch that does not fit
                raise _does_not_fit(len(seq), self.context_length)
        return self._greedy(seqs, max_new_tokens, None)

    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 64) -> list[str]:
        return [self.answer_text(o) for o in self.generate_batch_ids(prompts, max_new_tokens)]

    def _greedy(self, seqs: list[list[int]], max_new_tokens: int, on_token: Callable[[int, bool], bool] | None) -> list[list[int]]:
        """Greedy answers, each at most max_new_tokens and ending at the context length; with one
        sequence, on_token(token, is_eos) sees each token and returns True to stop there."""
        import numpy as np

        budgets = [min(max_new_tokens, self.context_length - len(s)) for s in seqs]
        outs: list[list[int]] = [[] for _ in seqs]
        finished = [b <= 0 for b in budgets]
        for _ in range(max(budgets, default=0)):
            # Left padding: the graph derives positions from the mask, so padded rows match unpadded ones.
            rows = [s + o for s, o in zip(seqs, outs)]
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = r
                mask[i, width - len(r) :] = 1
            logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
            for i, token in enumerate(logits[:, -1].argmax(-1)):
                if finished[i]:
                    continue
                token = int(token)
                if token in self.eos_ids:
                    finished[i] = True
                    if on_token is not None and len(seqs) == 1:
                        on_token(token, True)
                    continue
                outs[i].append(token)
                if on_token is not None and len(seqs) == 1 and on_token(token, False):
                    finished[i] = True
                elif len(outs[i]) >= budgets[i]:
                    finished[i] = True
            if all(finished):
                break
        return outs


Runner = Union[GenaiRunner, OnnxRunner]


def open_model(folder: str | os.PathLike, *, execution_provider: str | None = None) -> Runner:
    """Open an export folder with the runner its target needs (from manifest.json / export_info.json)."""
    folder = Path(folder)
    manifest = _manifest(folder)
    target = (manifest.target if manifest else None) or _read_json(folder / EXPORT_INFO).get("target")
    if target is None:
        target = "genai" if (folder / GENAI_CONFIG).is_file() else "onnx"
    if target == "genai":
        return GenaiRunner(folder, execution_provider=execution_provider)
    return OnnxRunner(folder)


# Prompts per generator batch in answer_all. Measured on the demo's v0002 int8 export (144
# holdout records of dbpedia, agnews and headlines at 8/8/24 new tokens, 2 cores): answers
# identical to one request at a time on all 144, in 289 s instead of 482 s (both under load).
ANSWER_BATCH = 16


# Answering one request at a time after a shared prefix read once
# (GenaiRunner.answers_after_shared_prefix) beats padded batches when the answers are short:
# on make demo's job-3 int8 export (2 cores), 48 dbpedia records took 8.8 s in batches of 16,
# 8.2 s one at a time and 5.3 s after their shared 61-token prefix; 48 agnews records 6.6 / 5.6
# / 4.0 s (prefix 34); 96 headlines (13-token prefix, answers ~14 tokens) 11.7 / 16.4 / 15.5 s;
# the same answers every way. An answer token decoded alone rather than in a batch costs about
# what 3.5 prompt tokens do, so the prefix must be this many times the answer budget.
SHARED_PREFIX_PER_ANSWER_TOKEN = 4


def answer_all(runner: Any, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int = ANSWER_BATCH) -> list[str]:
    """The runner's greedy answer to each prompt, in order. Prompts that share a long prefix
    for their answer budget are answered after it (answers_after_shared_prefix); others go
    through the generator in batches of similar length (less padding). batch_size 1, or a
    runner without generate_batch, answers one request at a time as a client sends it."""
    if batch_size <= 1 or not hasattr(runner, "generate_batch"):
        return [runner.generate(p, max_new_tokens) for p in prompts]
    if hasattr(runner, "answers_after_shared_prefix"):
        shared = runner.answers_after_shared_prefix(prompts, max_new_tokens)
        if shared is not None:
            return shared
    order = sorted(range(len(prompts)), key=lambda i: len(json.dumps(_messages(prompts[i]), ensure_ascii=False)))
    answers: list[str] = [""] * len(prompts)
    batched = True
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if batched and len(chunk) > 1:
            try:
                for i, text in zip(chunk, runner.generate_batch([prompts[i] for i in chunk], max_new_tokens)):
                    answers[i] = text
                continue
            except RuntimeError as e:
                # Some graphs refuse padded batches (Gemma 3's GroupQueryAttention in
                # onnxruntime-genai 0.18: "seqlens_k[0] = 70 is too small for sequence_length
                # 93"); one request at a time is what clients send anyway.
                log.warning("batched answers refused by the runtime; answering one at a time", extra={"error": str(e)[:300]})
                batched = False
        for i in chunk:
            answers[i] = runner.generate(prompts[i], max_new_tokens)
    return answers
