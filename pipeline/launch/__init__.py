"""Launching: `run` plans once and trains on local ranks or in torchrun's group (`torchrun`);
each rank gets one `job` (what to train) and hands back its result (`results` sums them up);
`options` says how a run trains, `spawn` is the process harness, and `reference` the ``--check``
run of the user's own model in one process."""
