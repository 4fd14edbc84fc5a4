"""The static memory plan: every intermediate tensor (and each kernel's workspace) at an offset in one arena,
tensors whose lifetimes overlap never sharing bytes.

Lifetime of a buffer: from the step that writes it to the last step that reads it (or a view of it), both
included. Placement: buffers one by one (largest first, or first used first, or largest size x lifetime first),
each at the lowest aligned offset clear of the buffers already placed that live at the same time (greedy, as
TFLite's planners); the smallest of those arenas is kept. The lower bound of any plan for this execution
order is the largest sum of bytes live at one step.
"""
from __future__ import annotations

from dataclasses import dataclass

ALIGN = 16


@dataclass(frozen=True)
class Buffer:
    """A block of the arena: its bytes and the first and last step that use it."""

    name: str
    nbytes: int
    first: int
    last: int


@dataclass(frozen=True)
class ArenaPlan:
    """Offsets of the buffers in the arena, the arena's size and the lower bound of any plan."""

    offsets: dict[str, int]
    arena_bytes: int
    lower_bound_bytes: int


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def lower_bound(buffers: list[Buffer]) -> int:
    """The largest sum of bytes live at one step."""
    steps = {step for b in buffers for step in (b.first, b.last)}
    return max((sum(b.nbytes for b in buffers if b.first <= step <= b.last) for step in steps), default=0)


ORDERS = {  # the orders buffers are placed in; the plan keeps the smallest arena
    "size": lambda b: (-b.nbytes, b.first, b.name),
    "first use": lambda b: (b.first, -b.nbytes, b.name),
    "size x lifetime": lambda b: (-b.nbytes * (b.last - b.first + 1), b.first, b.name),
}


def _placed(buffers: list[Buffer], order) -> dict[str, int]:
    """Each buffer, in `order`, at the lowest aligned offset clear of the placed buffers alive with it."""
    placed: list[tuple[int, Buffer]] = []
    for buffer in sorted(buffers, key=order):
        clashes = sorted((offset, offset + _aligned(b.nbytes)) for offset, b in placed
                         if b.first <= buffer.last and buffer.first <= b.last)
        offset = 0
        for start, end in clashes:
            if offset + buffer.nbytes <= start:
                break
            offset = max(offset, end)
        placed.append((offset, buffer))
    return {b.name: offset for offset, b in placed}


def plan_arena(buffers: list[Buffer]) -> ArenaPlan:
    """Offsets for `buffers` (names unique): the smallest arena of greedy placements in the ORDERS."""
    sizes = {b.name: _aligned(b.nbytes) for b in buffers}
    plans = [_placed(buffers, order) for order in ORDERS.values()]
    arena = lambda offsets: max((o + sizes[n] for n, o in offsets.items()), default=0)   # noqa: E731
    best = min(plans, key=arena)
    return ArenaPlan(best, arena(best), lower_bound(buffers))
