"""Tests of `pipeline.cli`, one file per module of the ``pipepart`` command."""
