"""The one clock of the benchmarks: wall time (``time.perf_counter``) and process CPU time
(``time.process_time``), read after a CUDA synchronise so queued GPU work counts where it ran.

Three ways to use it, one reading underneath:

* :class:`Span`: one timed block, ``with Span(device) as span: ...``;
* :func:`interleaved`: callables timed in turn, round after round, after untimed warm-up calls,
  so load from other processes inflates every one alike; report their :func:`median`;
* :class:`StepTimer`: a Lightning callback timing each training step of a fit, warm-up steps untimed.

Examples:
    >>> times = interleaved({"a": lambda: sum(range(1000)), "b": lambda: sorted(range(1000))}, rounds=5)
    >>> median(times["a"]).wall < 1.0
    True
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytorch_lightning as pl
import torch


@dataclass(frozen=True)
class Seconds:
    """A clock reading, or the difference of two: wall and process-CPU seconds."""

    wall: float
    cpu: float

    def __sub__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall - other.wall, self.cpu - other.cpu)


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA only; CPU work is done when the call returns)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device | str | None = None) -> Seconds:
    """The clock, read after the device's queued work is done."""
    sync(device)
    return Seconds(time.perf_counter(), time.process_time())


def median(times: list[Seconds]) -> Seconds:
    """Median wall and median CPU seconds (each on its own) of several timings."""
    return Seconds(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))


class Span:
    """Times one block: ``with Span(device) as span: work()``, then ``span.seconds``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds = Seconds(0.0, 0.0)

    def __enter__(self) -> Span:
        self._start = now(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = now(self.device) - self._start


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1, warmup: int = 1,
                device: torch.device | str | None = None) -> dict[str, list[Seconds]]:
    """Time each callable ``rounds x repeats`` times, interleaved: each round runs every callable
    ``repeats`` times in turn. First every callable runs ``warmup`` times untimed (allocator,
    kernel selection, lazy state).

    Returns:
        name -> one :class:`Seconds` per timed call, in order.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[Seconds]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                with Span(device) as span:
                    fn()
                times[name].append(span.seconds)
    return times


class StepTimer(pl.Callback):
    """Each training step's time (``on_train_batch_start`` to ``on_train_batch_end``: forward,
    backward, optimizer step) from step ``warmup`` on; earlier steps are untimed.

    Attributes:
        steps: one :class:`Seconds` per timed step, in order (timed step ``j`` is batch ``warmup + j``).
        span: from the start of the first timed step to the end of the last one; throughput comes
            from it, as it also counts Lightning's work between steps.
    """

    def __init__(self, warmup: int, device: torch.device | str | None = None) -> None:
        self.warmup, self.device = warmup, device
        self.steps: list[Seconds] = []
        self.span = Seconds(0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self._start = now(self.device)
            if batch_idx == self.warmup:
                self._first = self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            end = now(self.device)
            self.steps.append(end - self._start)
            self.span = end - self._first
