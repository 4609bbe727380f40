"""Checkpoints: `save_load` saves and restores a pipeline under the model's own names; `state` is a
rank's state by name, `write` the collective write and publish, `store` the folders on disk."""
