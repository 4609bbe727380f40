"""Models by name: the bundled examples (`examples`), ``hf:NAME`` models from a config (`hf`), and
the registry that resolves a spec and calls a factory (`registry`)."""
