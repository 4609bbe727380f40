"""Data parallelism around a pipeline: replicas on a (dp, pp) device mesh (`mesh`), their
gradients reduced once per optimizer step (`reduce`, `accumulate`), or the stages sharded over
the replicas (`fsdp`), each fed its own shard of the batch (`data`)."""

__all__: list[str] = []
