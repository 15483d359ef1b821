"""Export: a trained LoRA adapter -> an ONNX folder a client runs, checked and described.

One job per module:

  fuse       the adapter merged into an fp32 copy of its base; the portable adapter copy
  build      one export variant of a fused folder (onnxruntime-genai or plain ONNX), and
             which variants to try (settings resolution, `auto`'s candidates)
  check      the export check: build a candidate, run it on records as a client does,
             compare its answers with a reference (the fp32 model's)
  manifest   manifest.json as a typed Manifest: write, read, verify
  files      the export folder's file names and export_info.json
  exporter   export_model: reference -> candidates through the check -> manifest

This file imports nothing, so importing one module (e.g. the manifest, which the runners and
the version store read) does not pull in the others.
"""
