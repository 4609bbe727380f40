"""The configuration search of ``pipepart plan --auto``: schedule, micro-batch count, recompute
and device count, each priced by its best split and the simulator, the best made into a plan.

[Note: the configuration search]
A *configuration* is a schedule (every name in `partition.schedules.names.SCHEDULE_NAMES`, so
a schedule added there is searched with no code here; ``interleaved`` with 2 stages per device,
the V schedules with their 2), a micro-batch count ``m`` (a divisor of the global batch), whether
every stage recomputes its forward ([Note: recompute] in `partition.memory`), and a device
count ``p`` (one given, or every count up to a maximum: the first ``p`` devices of the pool,
then copies of the last). Each is priced by its optimal split (`PlanOptions.objective`, the
step objective unless told otherwise) and the plan's own predictor (`predict_step`: the
simulator plus the step's fixed costs), and ranked by the predicted step, or by throughput per
device (samples per second per device; ties to fewer devices). A schedule that refuses a
configuration (interleaved needs ``m`` a multiple of ``p``) and memory that no split fits are
recorded as *skipped*, with the reason.

Cost, and what keeps it down (a 32-block GPT over up to 16 devices: `benchmarks/auto_search`):

* The model is traced and costed twice, at the fewest and the most micro-batches; the counts
  between interpolate each node's FLOPs, saved activations and cut widths, which are affine in
  the micro-batch's rows (a position embedding's do not grow with them, a layer's grow in
  proportion; weights, buffers and dispatched operations do not change). The chosen plan is
  traced at its own size, so its numbers and tensors are the trace's. With ``profile``
  (measured times, not affine) and where the two traces' nodes differ, every count is traced.
* *Screening.* On graphs of more than `AutoOptions.cuts` + 1 nodes each configuration is first
  solved on `AutoOptions.cuts` cuts only, the narrowest of each of as many windows of equal
  compute (`narrow_cuts`; `partition.planning.restricted`: the optimum over those cuts, exactly), then the best `AutoOptions.refine` are solved on every cut
  and ranked again; the runner-ups come from those. Smaller graphs are solved whole at once.
* *Bounds.* A configuration cannot step faster than its busiest device computes: every rank
  runs its actions one after another, and the busiest holds at least the share ``P / sum f`` of
  all the step's compute ``P`` (the extra forward included under recompute). Nor faster than one
  micro-batch's forward and input-gradients (at least half of what follows the forward), stage
  after stage, on the fastest device. Configurations are priced from the least bound up and
  skipped once the bound is no better than the `AutoOptions.refine`-th best found (for
  throughput: the bound on it).
* Recompute is tried where the configuration does not fit without it or its best split is
  memory-bound (a stage at 98 % of its cap or more): elsewhere it adds its forward to every
  stage and buys nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from partition.algorithms.optimal import memory_fits
from partition.auto_choice import AUTO_OBJECTIVES, Candidate, Config
from partition.devices import Device
from partition.errors import InfeasibleError, PlanError
from partition.options import PlanOptions
from partition.planning.analysis import Analysis
from partition.planning.assemble import stage_plans
from partition.planning.predict import predict_step
from partition.planning.search_space import devices_for, divisors, interpolated, narrow_cuts
from partition.schedules.custom import schedule_for
from partition.schedules.names import SCHEDULE_NAMES, stages_per_rank
from partition.solve import Problem, Solution, min_devices

__all__ = ["AutoOptions", "AutoResult", "devices_for", "divisors", "interpolated", "search_configs"]

Progress = Callable[[str], None]
AnalysisFor = Callable[[int], Analysis]
_MEMORY_BOUND = 0.98


@dataclass(frozen=True, kw_only=True)
class AutoOptions:
    """What the configuration search tries; see [Note: the configuration search]."""

    global_batch: int
    """Samples per step; the micro-batch counts tried divide it."""
    devices: int | None = None
    """Exactly this many devices; None: every count from 1 to `max_devices`."""
    max_devices: int | None = None
    """The most devices to try (with `devices` None)."""
    objective: str = "step"
    """``step`` (the least predicted step) or ``throughput`` (samples per second per device)."""
    schedules: tuple[str, ...] = SCHEDULE_NAMES
    microbatches: tuple[int, ...] | None = None
    """The counts to try; None: every divisor of `global_batch`."""
    recompute: tuple[bool, ...] = (False, True)
    top: int = 5
    """Runner-ups kept."""
    refine: int = 8
    """Configurations screened on the narrow cuts that are then solved on every cut."""
    cuts: int = 128
    """Cuts a screening solve may use; a graph with no more cuts is solved whole at once."""

    def __post_init__(self) -> None:
        if self.objective not in AUTO_OBJECTIVES:
            raise PlanError(
                f"unknown auto objective {self.objective!r}; choose one of "
                f"{', '.join(AUTO_OBJECTIVES)}"
            )
        if self.global_batch < 1:
            raise PlanError(f"the global batch must be at least 1, got {self.global_batch}")
        if (self.devices is None) == (self.max_devices is None):
            raise PlanError("give the device count or the most devices to try (one of them)")
        if min(self.devices or 1, self.max_devices or 1) < 1:
            raise PlanError("device counts must be at least 1")
        for m in self.microbatches or ():
            if m < 1 or self.global_batch % m:
                raise PlanError(
                    f"{m} micro-batches do not divide the global batch of {self.global_batch}; "
                    f"use one of {', '.join(map(str, divisors(self.global_batch)))}"
                )
        if not self.schedules or not self.recompute or self.top < 0 or self.refine < 1:
            raise PlanError("the search needs a schedule, a recompute choice and refine >= 1")

    @property
    def counts(self) -> tuple[int, ...]:
        """The device counts tried, most first."""
        if self.devices is not None:
            return (self.devices,)
        return tuple(range(self.max_devices or 1, 0, -1))


@dataclass(frozen=True)
class Priced:
    """A configuration with its prediction (`Candidate`) and its best split."""

    candidate: Candidate
    solution: Solution


@dataclass(frozen=True)
class AutoResult:
    """What `search_configs` found: every configuration priced exactly, best first."""

    ranked: tuple[Priced, ...]
    searched: int
    skipped: tuple[str, ...]


class _Search:
    def __init__(
        self,
        analysis_for: AnalysisFor,
        pool: Sequence[Device],
        options: PlanOptions,
        auto: AutoOptions,
        progress: Progress | None,
    ) -> None:
        self.analysis_for, self.pool, self.options, self.auto = analysis_for, pool, options, auto
        self.progress = progress
        self.skipped: dict[str, list[Any]] = {}
        self.searched = 0

    def skip(self, kind: str, why: str) -> None:
        """Record a configuration not priced: the first reason of each ``kind``, and a count."""
        seen = self.skipped.setdefault(kind, [0, why.split("\n")[0]])
        seen[0] += 1

    def reasons(self) -> tuple[str, ...]:
        return tuple(
            why if count == 1 else f"{why} (and {count - 1} more like it)"
            for count, why in self.skipped.values()
        )

    def price(self, config: Config, cuts: Sequence[int] | None) -> Priced | None:
        """``config``'s best split (on ``cuts`` only, if given) and its predicted step; None
        (recorded) when no split fits or the schedule refuses."""
        analysis = self.analysis_for(config.microbatches)
        devices = devices_for(self.pool, config.devices)
        memory = replace(self.options.memory, recompute=config.recompute)
        options = replace(
            self.options,
            schedule=config.schedule,
            microbatches=config.microbatches,
            virtual=config.virtual,
            memory=memory,
        )
        self.searched += 1
        try:
            problem = Problem(
                graph=analysis.graph,
                devices=devices,
                schedule=config.schedule,
                microbatches=config.microbatches,
                virtual=config.virtual,
                memory=memory,
            )
            if not memory_fits(problem):  # cheaper than the solve's error and its advice
                raise InfeasibleError("no split fits")
            if cuts is None:
                solution = analysis.solve(devices, options)
            else:
                from partition.planning.restricted import solve_on_cuts

                usable = set(cuts)
                if analysis.mode_cuts is not None:
                    usable &= set(analysis.mode_cuts.usable())
                solution = solve_on_cuts(analysis.graph, sorted(usable), devices, options, "")
            plans = stage_plans(analysis.graph, solution)
            step, _ = predict_step(config.schedule, config.virtual, config.microbatches, plans)
        except InfeasibleError:
            self.skip("memory", f"{config.describe()}: no split fits memory")
            return None
        except PlanError as e:
            self.skip(config.schedule, f"{config.schedule}: {e}")
            return None
        peak = max(solution.evaluation.device_memory)
        throughput = self.auto.global_batch / step / config.devices if step > 0 else math.inf
        candidate = Candidate(
            config=config, step_time=step, peak_memory=peak, throughput=throughput
        )
        return Priced(candidate, solution)

    def key(self, p: Priced) -> tuple[float, ...]:
        """Smaller is better: the objective, then fewer devices, less memory, and the order of
        the names table (a tie goes to the plainer schedule), fewer micro-batches, no recompute."""
        c, cfg = p.candidate, p.candidate.config
        names = self.auto.schedules
        rank = names.index(cfg.schedule) if cfg.schedule in names else len(names)
        rest = (float(rank), float(cfg.microbatches), float(cfg.recompute))
        step, throughput = _digits(c.step_time), _digits(c.throughput)  # float noise ties
        if self.auto.objective == "throughput":
            return (-throughput, cfg.devices, step, c.peak_memory, *rest)
        return (step, cfg.devices, c.peak_memory, *rest)

    def bound(self, config: Config, analysis: Analysis) -> float:
        """A lower bound of the configuration's ranking key (its first term): see **Bounds**."""
        g = analysis.graph
        forward = float(g.forward.sum())
        work = float(g.compute.sum()) + (forward if config.recompute else 0.0)
        devices = devices_for(self.pool, config.devices)
        total = analysis.microbatches * work  # the step's compute, in FLOPs
        step = total / sum(d.flops for d in devices)  # shared out over every device
        # one micro-batch's forward, then at least its input-gradients (half of what is left),
        # one stage after another, all on the fastest device at best
        chain = (forward + 0.5 * (work - forward)) * analysis.microbatches / config.microbatches
        step = max(step, chain / max(d.flops for d in devices))
        if self.auto.objective == "throughput":
            return -self.auto.global_batch / step / config.devices if step > 0 else -math.inf
        return step

    def configs(self) -> list[Config]:
        """Every configuration to price (those a schedule refuses are recorded, not listed)."""
        auto, out = self.auto, []
        counts_m = auto.microbatches or divisors(auto.global_batch)
        for p in auto.counts:
            for name in auto.schedules:
                virtual = stages_per_rank(name, 2 if name == "interleaved" else 1)
                for m in counts_m:
                    try:
                        schedule_for(name, p, m, virtual)
                    except PlanError as e:
                        self.skip(name, f"{name}: {e}")
                        continue
                    for rc in sorted(set(auto.recompute)):
                        out.append(
                            Config(
                                schedule=name,
                                microbatches=m,
                                virtual=virtual,
                                devices=p,
                                recompute=rc,
                            )
                        )
        return out

    def _needless(self, config: Config, plain: dict[Config, Priced | None]) -> bool:
        """Whether ``config`` recomputes where its plain twin fits with room (see the Note)."""
        if not config.recompute or False not in self.auto.recompute:
            return False
        twin = plain.get(replace(config, recompute=False))
        return twin is not None and twin.solution.evaluation.peak_memory < _MEMORY_BOUND

    def run(self) -> AutoResult:
        auto = self.auto
        first = self.analysis_for((auto.microbatches or divisors(auto.global_batch))[0])
        cuts = narrow_cuts(first.graph, auto.cuts)
        todo = self.configs()
        bounds = [self.bound(c, first) for c in todo]
        order = sorted(range(len(todo)), key=lambda i: (bounds[i], i))
        kept: list[Priced] = []
        plain: dict[Config, Priced | None] = {}
        keep = auto.refine if cuts is not None else auto.top + 1
        for done, i in enumerate(order):
            config = todo[i]
            if len(kept) >= keep and bounds[i] >= self.key(kept[keep - 1])[0]:
                continue  # it cannot make the list; see **Bounds**
            if self._needless(config, plain):
                continue
            if self.progress and done % 10 == 0:
                self.progress(f"auto: {done}/{len(order)} configurations, {config.describe()}")
            priced = self.price(config, cuts)
            if priced is None and cuts is not None:  # the narrow cuts may be what does not fit
                priced = self.price(config, None)
            if not config.recompute:
                plain[config] = priced
            if priced is not None:
                kept.append(priced)
                kept.sort(key=self.key)
        if cuts is not None:  # the best screened, solved on every cut and ranked again
            if self.progress:
                self.progress(f"auto: solving the best {min(len(kept), keep)} on every cut")
            refined = [self.price(p.candidate.config, None) for p in kept[:keep]]
            kept = sorted((p for p in refined if p is not None), key=self.key)
        return AutoResult(tuple(kept), self.searched, self.reasons())


def _digits(x: float) -> float:
    """``x`` to 12 significant digits: predictions that differ only in float noise tie."""
    return float(f"{x:.12g}")


def search_configs(
    analysis_for: AnalysisFor,
    pool: Sequence[Device],
    options: PlanOptions,
    auto: AutoOptions,
    progress: Progress | None = None,
) -> AutoResult:
    """Every configuration `auto` allows, priced by its best split, best first; see
    [Note: the configuration search].

    Args:
        analysis_for: the model analysed at a micro-batch count.
        pool: the devices, in pipeline order (a count past them repeats the last).
        options: the planning options the configurations vary (schedule, micro-batches,
            virtual stages, recompute); their objective splits each configuration.

    Raises:
        InfeasibleError: no configuration fits; the message says the fewest devices that would.
    """
    result = _Search(analysis_for, pool, options, auto, progress).run()
    if not result.ranked:
        raise InfeasibleError(_nothing_fits(analysis_for, pool, options, auto, result))
    return result


def _nothing_fits(
    analysis_for: AnalysisFor,
    pool: Sequence[Device],
    options: PlanOptions,
    auto: AutoOptions,
    result: AutoResult,
) -> str:
    most = max(auto.counts)
    m = max(auto.microbatches or divisors(auto.global_batch))  # the smallest micro-batch
    schedule = "1f1b" if "1f1b" in auto.schedules else auto.schedules[0]
    recompute = True in auto.recompute
    virtual = stages_per_rank(schedule, 2 if schedule == "interleaved" else 1)
    problem = Problem(
        graph=analysis_for(m).graph,
        devices=devices_for(pool, most),
        schedule=schedule,
        microbatches=m,
        virtual=virtual,
        memory=replace(options.memory, recompute=recompute),
    )
    fewest = min_devices(problem)
    config = Config(
        schedule=schedule, microbatches=m, virtual=virtual, devices=fewest or 0, recompute=recompute
    )
    why = "; ".join(result.skipped[:3])
    head = f"no configuration of up to {most} device(s) fits memory ({why})"
    if fewest is None:
        return head + ": no device count fits either; use devices with more memory"
    return (
        f"{head}. The fewest devices that fit is {fewest} ({config.describe()}): use "
        f"--devices {fewest} or --max-devices {fewest}"
    )
