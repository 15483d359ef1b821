"""The chat template a base is trained and served with: the `model.chat_template` setting, and
a default for bases that ship none.

  choose_template(tokenizer, model_dir, setting)   # -> the template to use, or None (keep the base's)

`model.chat_template`:
  ""              the base's own template; a base without one gets its family's default
                  (FAMILY_DEFAULTS by config.json's model_type, else ChatML)
  "chatml"/"gemma"  a known template (KNOWN_TEMPLATES), replacing the base's own
  a path          a Jinja file (ending in .jinja), replacing the base's own

edgekif.model.load_tokenizer applies it; fused and exported folders save that tokenizer, so
training, the export's answer check, the zero-shot base export, `edgekif infer` and the API all
render prompts with this one template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError
from .inputs import CHATML_TEMPLATE

# Gemma's own turn format (the one Gemma 3 instruct checkpoints ship), without their
# raise_exception checks: a system message is prepended to the first user turn (Gemma has no
# system role), the assistant role is spelled "model". The BOS token comes from the template,
# as in Gemma's: apply_chat_template tokenises without adding special tokens.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

KNOWN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}

# config.json model_type -> the default template of a base without one. Gemma checkpoints have
# <start_of_turn>/<end_of_turn> as single tokens and were instruction-tuned on that format, so a
# Gemma base (even an untuned one) is best served by it. Every other family gets ChatML: SmolLM2
# and Qwen2 use it, and its role markers are plain text where they are not special tokens, which
# still separates system, user and assistant turns (the plain-text fallback of
# edgekif.inputs.render_prompt does not).
FAMILY_DEFAULTS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma"}
FALLBACK = "chatml"


def configured_template(setting: str) -> str | None:
    """The template `model.chat_template` names: None for "" (the base's own), a known
    template by name, or a .jinja file's text. ConfigError otherwise."""
    setting = (setting or "").strip()
    if not setting:
        return None
    if setting in KNOWN_TEMPLATES:
        return KNOWN_TEMPLATES[setting]
    path = Path(os.path.expanduser(setting))
    if path.suffix != ".jinja":
        raise ConfigError(f"model.chat_template: {setting!r} is not one of {', '.join(KNOWN_TEMPLATES)} or a .jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"model.chat_template: cannot read {path}: {e}") from e
    if not text.strip():
        raise ConfigError(f"model.chat_template: {path} is empty")
    return text


def folder_template(model_dir: str | os.PathLike) -> str | None:
    """The chat template a model folder ships: chat_template.jinja, else tokenizer_config.json's."""
    folder = Path(model_dir)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and template else None


def has_own_template(model_dir: str | os.PathLike) -> bool:
    """Whether a model folder ships a chat template of its own (an instruction-tuned model),
    before any template edgekif gives it."""
    return folder_template(model_dir) is not None


def family_default(model_dir: str | os.PathLike) -> str:
    """The name of the default template for the model in `model_dir` (by config.json's model_type)."""
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return FAMILY_DEFAULTS.get(str(model_type), FALLBACK)


def choose_template(tokenizer, model_dir: str | os.PathLike, setting: str = "") -> str | None:
    """The template to set on `tokenizer` (loaded from `model_dir`), or None to keep its own:
    the configured one if any, else the family default when the tokenizer has none."""
    configured = configured_template(setting)
    if configured is not None:
        return configured
    if getattr(tokenizer, "chat_template", None):
        return None
    return KNOWN_TEMPLATES[family_default(model_dir)]
