"""Planning: from a model to a `Plan`, with the schedule's in-flight counts and its simulated step.

`analysis` traces and costs a model (`analyze`); `model` is the front door (`plan_model`, `plan_analysis`);
`predict` prices a plan's step with the simulator and reprices a plan on other devices; `auto`
searches the configuration (schedule, micro-batches, recompute, devices) for ``plan --auto``.
"""
