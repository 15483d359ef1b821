"""Minimal client of an edgekif data folder: answer one prompt with the current model.

    python tools/client_example.py DATA_DIR "your prompt" [max_new_tokens]

Needs only onnxruntime-genai. Resolves DATA_DIR/models/current once, so a publish that
happens while it runs does not mix two versions.
"""

import json
import os
import sys

import onnxruntime_genai as og


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    data_dir, prompt = sys.argv[1], sys.argv[2]
    max_new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    link = os.path.join(data_dir, "models", "current")
    if not os.path.lexists(link):
        print(f"{link}: no model published yet", file=sys.stderr)
        return 2
    folder = os.path.realpath(link)  # resolve once: keep this version even if current switches
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    tasks = ", ".join(t.get("name", t.get("id", "?")) for t in manifest.get("tasks", []))
    print(f"model {os.path.basename(folder)} ({manifest['created']}; tasks: {tasks or 'none'})", file=sys.stderr)

    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    with open(os.path.join(folder, "genai_config.json")) as f:
        context_length = json.load(f)["model"]["context_length"]
    params.set_search_options(do_sample=False, max_length=min(len(ids) + max_new_tokens, context_length))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    stream = tokenizer.create_stream()
    while not generator.is_done():
        generator.generate_next_token()
        print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
