"""One rank's schedule executor: runs its list of actions over micro-batches, with the messages.

The executor owns what the actions need between them: the links to the neighbouring stages and
their receive-buffer pools (sized by the schedule's peak in-flight micro-batches, see
`partition.schedules.actions.peak_inflight`), the transport, and per step an inbox and outbox of tensors
by ``(kind, stage, micro-batch)``. It knows nothing of weights or optimizers (`pipeline.runtime.pipeline`)
and each stage's own forward and backward is a `pipeline.runtime.stage.StageExecutor`'s.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from partition.schedules.actions import Action, Kind, Schedule, peak_inflight
from partition.schedules.simulate import TimelineEvent
from partition.split import Stage
from pipeline.parallel.mesh import new_subgroup
from pipeline.runtime.comm import BufferPool, Link, Transport, gradient_specs
from pipeline.runtime.failure import locate
from pipeline.runtime.stage import StageExecutor

__all__ = ["RankExecutor"]


class RankExecutor:
    """Runs one rank's actions of a schedule; see the module docstring."""

    def __init__(
        self,
        stages: Sequence[Stage],
        schedule: Schedule,
        executors: dict[int, StageExecutor],
        *,
        rank: int,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        check_boundaries: bool = True,
        link_groups: bool | None = None,
    ) -> None:
        """Set up the links, pools and transport; a collective when ``link_groups`` is on
        (every rank creates every link's group, in order).

        Args:
            stages: every stage of the pipeline (those of other ranks may stay on meta).
            executors: this rank's stages' executors, by stage index.
            rank: this rank, in ``group`` (default: the world).
            device: where received tensors go.
            check_boundaries: check every tensor crossing a cut against the plan.
            link_groups: one communicator per link (default: on backends other than gloo); see
                [Note: one communicator per link] in `pipeline.runtime.comm`.
        """
        self.stages, self.schedule, self.executors = stages, schedule, executors
        self.rank, self.device, self.group = rank, device, group
        self.check_boundaries = check_boundaries
        self._links_setup()
        self.transport = Transport(
            rank, group=group, validate=check_boundaries, link_groups=self._link_groups(link_groups)
        )
        self._expected: dict[int, list[tuple[Link, BufferPool, list[int]]]] = {}

    def _link_groups(self, wanted: bool | None) -> dict[tuple[str, int], dist.ProcessGroup] | None:
        """A two-rank group per link where the backend needs it; see [Note: one communicator
        per link] in `pipeline.runtime.comm`."""
        if wanted is None:
            wanted = dist.get_backend(self.group) != "gloo"
        if not wanted:
            return None
        rank_of = self.schedule.stage_to_rank
        groups = {}
        for cut in range(len(self.stages) - 1):  # a collective: every rank, every link, in order
            pair = tuple(sorted({rank_of(cut), rank_of(cut + 1)}))
            if len(pair) == 2:
                for direction in ("activation", "gradient"):
                    groups[direction, cut] = new_subgroup(self.group, pair)
        return groups

    def _links_setup(self) -> None:
        stages, schedule = self.stages, self.schedule
        rank_of = schedule.stage_to_rank
        self._act_out: dict[int, Link] = {}
        self._act_in: dict[int, Link] = {}
        self._grad_out: dict[int, Link] = {}
        self._grad_in: dict[int, Link] = {}
        self._pools: dict[tuple[str, int], BufferPool] = {}
        peak = peak_inflight(schedule)
        for s in range(len(stages) - 1):
            act = Link("activation", s, s + 1, rank_of(s), rank_of(s + 1), stages[s].outputs)
            grad = Link(
                "gradient",
                s + 1,
                s,
                rank_of(s + 1),
                rank_of(s),
                gradient_specs(stages[s + 1].inputs),
            )
            self._act_out[s], self._act_in[s + 1] = act, act
            self._grad_out[s + 1], self._grad_in[s] = grad, grad
            # + 1: the receive posted ahead (see [Note: receiving ahead] in pipeline.runtime.comm)
            if rank_of(s + 1) == self.rank and rank_of(s) != self.rank:
                self._pools["act", s + 1] = BufferPool(act.specs, self.device, peak[s + 1] + 1)
            if rank_of(s) == self.rank and rank_of(s + 1) != self.rank:
                self._pools["grad", s] = BufferPool(grad.specs, self.device, 2)
        self._remote = {s: rank_of(s) != self.rank for s in range(len(stages))}

    def run(
        self,
        actions: Sequence[Action],
        mb_inputs: list[Any] | None,
        mb_targets: list[Any] | None,
        *,
        train: bool,
        step: int = 0,
        after: Mapping[int, Callable[[], None]] | None = None,
    ) -> tuple[dict[int, Any], list[TimelineEvent]]:
        """Run ``actions`` (this rank's, in order) on these micro-batches; returns the last
        stage's per-micro-batch results (evaluation) and each action's ``(rank, action, start,
        end)``.

        Args:
            train: with autograd, the stages' forward and backward; else forward only.
            step: the step's number, in the place of an error.
            after: action index -> what to call once that action is done (the start of a
                gradient reduction: `pipeline.parallel.accumulate.GradientSync.hooks`).

        Raises:
            StageError: an action failed, with its place (see [Note: failing loudly] in
                `pipeline.runtime.failure`); also an instance of the original exception's type.
        """
        self._inbox: dict[tuple[str, int, int], list[Tensor]] = {}
        self._outbox: dict[tuple[str, int, int], list[Tensor]] = {}
        self._held: dict[tuple[int, int], list[tuple[BufferPool, list[Tensor]]]] = (
            collections.defaultdict(list)
        )
        self._results: dict[int, Any] = {}
        self._mb_inputs, self._mb_targets, self._train = mb_inputs, mb_targets, train
        for e in self.executors.values():
            e.reset()
        key = id(actions)
        if key not in self._expected:
            self._expected[key] = self._receives(actions)
        self.transport.expect(self._expected[key])
        events: list[TimelineEvent] = []
        clock = time.monotonic
        handlers = self._handlers
        grad_mode = torch.enable_grad() if train else torch.no_grad()
        after = after or {}
        with grad_mode:
            for index, action in enumerate(actions):
                start = clock()
                try:
                    handlers[action.kind](action.stage, action.microbatch)
                    if index in after:
                        after[index]()
                except Exception as e:
                    raise locate(e, self.rank, step, action) from e
                events.append((self.rank, action, start, clock()))
        try:
            self.transport.flush()
        except Exception as e:
            raise locate(e, self.rank, step, what="flush") from e
        self._inbox = self._outbox = {}
        self._held.clear()
        self._mb_inputs = self._mb_targets = None
        return self._results, events

    @property
    def _handlers(self) -> dict[Kind, Callable[[int, int], None]]:
        return {
            Kind.F: self._forward,
            Kind.B: self._backward,
            Kind.I: self._backward_input,
            Kind.W: self._backward_weight,
            Kind.SEND_F: self._send_forward,
            Kind.RECV_F: self._recv_forward,
            Kind.SEND_B: self._send_backward,
            Kind.RECV_B: self._recv_backward,
        }

    def _recv_forward(self, s: int, i: int) -> None:
        buffers = self.transport.recv(self._act_in[s], i)
        self._inbox["act", s, i] = buffers
        self._held[s, i].append((self._pools["act", s], buffers))

    def _recv_backward(self, s: int, i: int) -> None:
        buffers = self.transport.recv(self._grad_in[s], i)
        self._inbox["grad", s, i] = buffers
        self._held[s, i].append((self._pools["grad", s], buffers))

    def _receives(self, actions: Sequence[Action]) -> list[tuple[Link, BufferPool, list[int]]]:
        """Per incoming link, its pool and the micro-batches ``actions`` receive, in order."""
        order: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
        for a in actions:
            if a.kind is Kind.RECV_F:
                order["act", a.stage].append(a.microbatch)
            elif a.kind is Kind.RECV_B:
                order["grad", a.stage].append(a.microbatch)
        links = {"act": self._act_in, "grad": self._grad_in}
        return [(links[kind][s], self._pools[kind, s], mbs) for (kind, s), mbs in order.items()]

    def _send_forward(self, s: int, i: int) -> None:
        self.transport.send(self._act_out[s], self._outbox.pop(("act", s, i)), i)

    def _send_backward(self, s: int, i: int) -> None:
        self.transport.send(self._grad_out[s], self._outbox.pop(("grad", s, i)), i)

    def _forward(self, s: int, i: int) -> None:
        executor = self.executors[s]
        if s == 0:
            assert self._mb_inputs is not None, "stage 0 needs the inputs: pass them to step()"
            inputs = self._mb_inputs[i]
        else:
            inputs = self._inbox.pop(("act", s, i))
        last = s == len(self.stages) - 1
        target = None
        if last and self._mb_targets is not None:
            target = self._mb_targets[i]
        if self._train:
            outputs = executor.forward(i, inputs, target)
        else:
            outputs = executor.evaluate(inputs, target)
            if last:
                self._results[i] = outputs
        if not last:
            self._hand_on("act", s, s + 1, i, outputs)
        if not self._train:
            self._release(s, i)

    def _hand_on(self, kind: str, s: int, to: int, i: int, tensors: list[Tensor]) -> None:
        if self._remote[to]:
            # A tensor passed straight through (a skip connection) may live in a receive buffer
            # that is recycled before the lazy send completes: send a copy of it instead.
            held = {
                b.untyped_storage().data_ptr()
                for _, bufs in self._held.get((s, i), ())
                for b in bufs
            }
            if held:
                tensors = [
                    t.clone() if t.untyped_storage().data_ptr() in held else t for t in tensors
                ]
            self._outbox[kind, s, i] = tensors
        else:  # the neighbour is on this rank (a one-rank pipeline): no message
            link = self._act_out[s] if kind == "act" else self._grad_out[s]
            if self.check_boundaries:
                link.check(tensors, i)
            self._inbox[kind, to, i] = tensors

    def _grads_for(self, s: int, i: int) -> list[Tensor] | None:
        return None if s == len(self.stages) - 1 else self._inbox.pop(("grad", s, i))

    def _backward(self, s: int, i: int) -> None:
        grads = self.executors[s].backward(i, self._grads_for(s, i))
        self._release(s, i)
        if s > 0:
            self._hand_on("grad", s, s - 1, i, grads)

    def _backward_input(self, s: int, i: int) -> None:
        grads = self.executors[s].backward_input(i, self._grads_for(s, i))
        if s > 0:
            self._hand_on("grad", s, s - 1, i, grads)

    def _backward_weight(self, s: int, i: int) -> None:
        self.executors[s].backward_weight(i)
        self._release(s, i)

    def _release(self, s: int, i: int) -> None:
        for pool, buffers in self._held.pop((s, i), ()):
            pool.release(buffers)
