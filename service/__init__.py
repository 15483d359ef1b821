"""The edgekif daemon (watch the inbox, train, evaluate, export, publish) and its systemd glue.

The ML library (`edgekif`) knows nothing of this package; this package imports the ML parts
lazily, inside the stage calls, so an idle daemon stays small (no torch).
"""
