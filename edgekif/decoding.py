"""How an answer is decoded: the next-token choice (greedy, or sampled with a seed) and the
answer's text as it grows (always whole UTF-8 characters, cut at stop strings).

  Sampling(temperature=0.7, seed=1, ...)   the search options of one generation (greedy by default)
  TextStream(decode, stops)               token ids in, text pieces out: push(token) / finish()

Why decode the whole answer at every step rather than token by token: a byte-level tokenizer
splits an emoji or a CJK character over several tokens, and a token decoded alone (or the
answer decoded up to such a token) ends in U+FFFD. Decoding everything so far and emitting only
what is new, holding back a trailing U+FFFD until the character completes, gives pieces that
join to exactly the final text, and never a replacement character from a partial one. A cut
at the token limit drops the partial character the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import EdgekifError

REPLACEMENT = "\ufffd"


class DecodingError(EdgekifError):
    """A decoding option is out of range or unsupported by the runner; `param` names it."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class Sampling:
    """Search options of one generation. The default (temperature 0) is greedy decoding, as
    training and evaluation decode; top_p/top_k/seed then change nothing (the argmax is in
    every nucleus), repetition_penalty still applies (it rescales the logits before the argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut (onnxruntime-genai's own default would be 50)
    seed: int | None = None  # None: a random seed per generation (when sampling)
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already in the sequence

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def is_default(self) -> bool:
        return self.greedy and self.repetition_penalty == 1.0

    def search_options(self, vocab_size: int | None = None) -> dict[str, Any]:
        """The keyword arguments for onnxruntime-genai's GeneratorParams.set_search_options."""
        if vocab_size and self.top_k > vocab_size:
            raise DecodingError(f"top_k is {self.top_k}; this model's vocabulary has {vocab_size} tokens", param="top_k")
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": float(self.repetition_penalty)}
        opts: dict[str, Any] = {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p),
                                "top_k": int(self.top_k), "repetition_penalty": float(self.repetition_penalty)}
        if self.seed is not None:
            opts["random_seed"] = int(self.seed)
        return opts


GREEDY = Sampling()


def _held_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back: the next
    token may complete the stop, and nothing past a stop may be emitted)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """The text of a growing answer: push each token id, get the new text (maybe "").

    `decode(ids) -> str` decodes a token list. With stop strings, the answer ends before the
    first one (`stopped` turns true: stop generating); text that may be the start of a stop is
    held back until it is known not to be one. `text` is the answer so far that is safe to
    show; after finish() it is the final answer, and the pieces returned join to it.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = ""  # what was returned so far
        self.stopped = False
        self._final: str | None = None

    def _visible(self, final: bool) -> str:
        text = self._decode(self.ids)
        # a trailing U+FFFD is a character still being spelled out (or, at the end, one the
        # token limit cut): never shown
        text = text.rstrip(REPLACEMENT)
        if self.stops:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                return text[:cut]
            if not final:
                text = text[: len(text) - _held_stop_prefix(text, self.stops)]
        return text

    def _emit(self, text: str) -> str:
        # A tokenizer may rewrite earlier text as more arrives (rare: cleanup of spaces); what is
        # sent is never taken back, so wait until the text extends what was sent.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        return self._emit(self._visible(final=False))

    def finish(self) -> str:
        """The rest of the answer (the end of generation: EOS, the token limit or a stop)."""
        if self._final is None:
            self._final = self._visible(final=True)
            if not self._final.startswith(self.sent):  # see _emit: keep the pieces' join equal to the answer
                self._final = self.sent
        return self._emit(self._final)

    @property
    def text(self) -> str:
        return self._final if self._final is not None else self.sent


def decode_answer(decode: Callable[[list[int]], str], ids: Sequence[int]) -> str:
    """A finished answer's text: whole characters only (a cut at the token limit drops a partial one)."""
    return decode(list(ids)).rstrip(REPLACEMENT)
