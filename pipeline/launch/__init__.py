"""Launching: `run` trains on local ranks or in torchrun's group, `spawn` is the process harness,
`reference` the ``--check`` run of the user's own model in one process."""
