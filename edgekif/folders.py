"""The file names of an export folder, shared by the exporter (edgekif.export) and the runners
that read it (edgekif.infer) without either importing the other."""

MANIFEST = "manifest.json"
EXPORT_INFO = "export_info.json"  # target/precision/EP of an export folder, written by the exporters
MANIFEST_FORMAT = 1
ONNX_MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
