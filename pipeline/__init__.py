"""pipepart.pipeline: schedules, simulator and runtime for training a split model across ranks."""
