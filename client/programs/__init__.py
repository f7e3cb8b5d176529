"""Programs built on the client library: the quickstart (the README's main job), the example
trainer, the evaluation and corruption commands, and the digits study; with the model zoo,
the digits data and the local dispatcher they share. Each runs as ``python -m
client.programs.NAME``."""
