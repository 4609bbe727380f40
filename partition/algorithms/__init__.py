"""Partitioning algorithms: the objective, the exact partitioner and the baselines."""

from partition.algorithms.baselines import params, time, uniform
from partition.algorithms.objective import Bounds, Evaluation, evaluate
from partition.algorithms.optimal import min_devices, optimal_split
from partition.algorithms.problem import Problem

__all__ = [
    "Bounds",
    "Evaluation",
    "Problem",
    "evaluate",
    "min_devices",
    "optimal_split",
    "params",
    "time",
    "uniform",
]
