"""onnxruntime-genai's model builder with the model config normalised first: the child process
edgekif.export.build runs (`python -m edgekif.export.genai_builder <the builder's own args>`).

Why a wrapper: transformers 5 keeps Gemma 3's RoPE as one dict per attention kind
(`rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`) and re-nests a flat
config.json on load, so rewriting the folder's config.json cannot help. The builder
(onnxruntime-genai 0.18, builders/gemma.py Gemma3Model) reads the flat form: rope_parameters
with a top-level "rope_type", rope_theta, and rope_local_base_freq; given the nested form it
fails with KeyError 'rope_type'. So the wrapper loads the config as the builder does
(parse_extra_options), flattens it (flat_rope_config) and then calls the builder's create_model.
The installed package is not modified; configs already flat (Llama, Qwen2, SmolLM2) pass as they are.

A build with `prune_lm_head=true` gets its LM head rewritten after the builder is done
(edgekif.export.lm_head): the builder's own prune reads the batch's last position, a pad for
every right-padded row, so the wrapper never leaves it as the builder made it.
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError


def flat_rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a config.json dict) with transformers 5's per-attention-kind RoPE flattened into
    the fields the genai builder reads; any other config is returned unchanged (equal).

    Nested: rope_parameters = {"full_attention": {rope_type, rope_theta, ...},
                               "sliding_attention": {rope_type, rope_theta}}
    Flat:   rope_parameters = the full-attention dict, rope_theta = its theta,
            rope_local_base_freq = the sliding-attention theta (transformers 4's Gemma 3 fields).
    """
    rope = config.get("rope_parameters")
    if not (isinstance(rope, dict) and "full_attention" in rope and all(isinstance(v, dict) for v in rope.values())):
        return config
    unknown = set(rope) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ExportError(f"rope_parameters: attention kinds {sorted(unknown)} are not supported by the genai builder")
    full = dict(rope["full_attention"])
    full.setdefault("rope_type", "default")
    out = dict(config, rope_parameters=full)
    if "rope_theta" in full:
        out["rope_theta"] = full["rope_theta"]
    if "sliding_attention" in rope:
        sliding = rope["sliding_attention"]
        # the builder's local-layer cache changes only theta; any scaling of its own would be lost
        if sliding.get("rope_type", "default") != "default":
            raise ExportError(f"rope_parameters.sliding_attention: rope_type {sliding.get('rope_type')!r} is not supported by the genai builder")
        if "rope_theta" in sliding:
            out["rope_local_base_freq"] = sliding["rope_theta"]
    return out


def normalise_hf_config(hf_config: Any) -> list[str]:
    """Apply flat_rope_config to a transformers config object in place; the changed keys."""
    before = hf_config.to_dict()
    after = flat_rope_config(before)
    changed = [k for k, v in after.items() if k not in before or before[k] != v]
    for key in changed:
        setattr(hf_config, key, after[key])
    return changed


def prunes_lm_head(extra_options: list[str] | None) -> bool:
    """Whether the builder's --extra_options ask for prune_lm_head (the builder's own truth values)."""
    values = [kv.split("=", 1)[1].strip() for kv in extra_options or [] if kv.split("=", 1)[0].strip() == "prune_lm_head" and "=" in kv]
    return bool(values) and values[-1] in {"true", "True", "1"}


def main() -> None:
    # The builder's own __main__, with normalise_hf_config between loading the config and building.
    from onnxruntime_genai.models import builder

    args = builder.get_args()
    # the model, its folders, precision, provider and cache: the same six for both calls
    common = (args.model_name, args.input, args.output, args.precision, args.execution_provider, args.cache_dir)
    extra_options = builder.parse_extra_options(
        *common,
        args.extra_options,
        builder_config_version=args.builder_config_version,
        target_options=args.target_options,
        drafter_options=args.drafter_options,
        speculative_options=args.speculative_options,
        runtime_config=args.runtime_config,
        search=args.search,
    )
    if changed := normalise_hf_config(extra_options["hf_details"]["hf_config"]):
        print(f"edgekif: config normalised for the builder: {', '.join(changed)}", flush=True)
    builder.create_model(*common, **extra_options)
    if prunes_lm_head(args.extra_options):
        from .lm_head import last_position_head

        last_position_head(args.output)
        print("edgekif: LM head rewritten to read each row's last real position", flush=True)


if __name__ == "__main__":
    main()
