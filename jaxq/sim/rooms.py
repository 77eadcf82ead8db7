"""Waiting rooms of the event engines: per class, a ring of the waiting jobs' entry times.

Each class's room (the prefill queue, and each decode buffer) is a ring: ``start`` is the cell of the
oldest entry and the count is stored, so the live entries are cells start, start + 1, ... (mod width),
oldest first, and reading a head is O(1). Entries arrive in time order, so a push writes the cell after
the newest and taking the head advances ``start``: both O(1). Only an abandonment (a uniformly chosen
entry) moves cells: the newer entries shift one cell toward the head, a masked pass over the room
(batched, it runs only in the steps where some replica of the batch abandons: ``skip_unless``).
Cells past the count hold +inf (a state holds no stale values).

The entry times serve one purpose: FCFS *across* classes (which class's head is oldest). With one class
there is nothing to order (and abandonment, memoryless, needs no ages), so a one-class model keeps
rooms of width 0: the counts alone, no capacity, never a lost job, and no O(room) shift. A policy
without decode buffers has a buffer family of zero rows: every operation on it does nothing.

The functions take any pytree with the family's three fields (``ROOMS``) and return it updated.

**Job indices.** A trace replay (:class:`jaxq.sim.general.TraceJobs`) must know *which* job waits in
each cell, to give it its own token counts when it leaves. Its state then carries, beside each family,
a ring of job indices of the same shape (``ROOM_JOBS``; -1 in empty cells) that every operation below
moves exactly as it moves the entry times; without a replay these fields are None and cost nothing.
A replay keeps entry times even for one class (the ring needs cells): ``room_width(spec, jobs=True)``.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from .lockstep import skip_unless

_I32 = jnp.int32
ROOMS = {"queue": ("queue", "queue_start", "q_p"), "buffers": ("buffers", "buffer_start", "q_d")}
ROOM_JOBS = {"queue": "queue_job", "buffers": "buffers_job"}


def room_width(spec, jobs: bool = False) -> int:
    """Entry-time cells per class: ``spec.room``, or 0 (counts only) for a one-class model that tracks
    no job indices."""
    return 0 if spec.num_classes == 1 and not jobs else spec.room


def _jobs(state, which, rows, width):
    """The family's job-index ring as (rows, width), or None when the state tracks no jobs."""
    jobs = getattr(state, ROOM_JOBS[which], None)
    return None if jobs is None else jobs.reshape(rows, width)


def _set_jobs(state, which, jobs):
    if jobs is None:
        return state
    name = ROOM_JOBS[which]
    shape = getattr(state, name).shape
    return eqx.tree_at(lambda s: getattr(s, name), state, jobs.reshape(shape))


def room_head_job(state, which, row):
    """The job index at the head of room ``row`` (-1 if empty or ``row`` < 0); the state must track jobs."""
    cells, start, count = _room(state, which)
    jobs = _jobs(state, which, count.size, cells.shape[-1])
    r = jnp.maximum(row, 0)
    return jnp.where((row >= 0) & (count[r] > 0), jobs[r, start[r]], -1)


def _room(state, which):
    """A room family as (cells (rows, width), start (rows,), count (rows,)); a buffer's row is b x I + c."""
    cells, start, count = (getattr(state, f) for f in ROOMS[which])
    return cells.reshape(count.size, cells.shape[-1]), start.reshape(-1), count.reshape(-1)


def _set_room(state, which, cells, start, count):
    names = ROOMS[which]
    shapes = [getattr(state, f).shape for f in names]
    return eqx.tree_at(lambda s: tuple(getattr(s, f) for f in names), state,
                       (cells.reshape(shapes[0]), start.reshape(shapes[1]), count.reshape(shapes[2])))


def room_heads(state, which):
    """Entry time of each room's oldest waiting job (+inf if empty), shaped as its count. A width-0
    room has no ages: its classes (one) are ordered by nothing, so any finite value marks a non-empty
    room."""
    cells, start, count = _room(state, which)
    if cells.shape[-1] == 0 or count.size == 0:
        heads = jnp.zeros(count.shape, cells.dtype)
    else:
        heads = jnp.take_along_axis(cells, start[:, None], axis=1)[:, 0]
    return jnp.where(count > 0, heads, jnp.inf).reshape(getattr(state, ROOMS[which][2]).shape)


def _wrap(i, width):
    return jnp.where(i >= width, i - width, i)


def room_push(state, which, row, time, do, job=None):
    """Append ``time`` (and ``job``, where the state tracks jobs) to room ``row`` where ``do`` (row < 0:
    nothing); returns (state, lost), lost meaning the room was full (or the family has no rooms)."""
    cells, start, count = _room(state, which)
    if count.size == 0:
        return state, do & (row >= 0)
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    width = cells.shape[-1]
    if width == 0:
        return _set_room(state, which, cells, start, count.at[r].add(do.astype(_I32))), jnp.zeros((), bool)
    full = count[r] >= width
    ok = do & ~full
    cell = jnp.minimum(_wrap(start[r] + count[r], width), width - 1)
    jobs = _jobs(state, which, count.size, width)
    if jobs is not None:
        jobs = jobs.at[r, cell].set(jnp.where(ok, job, jobs[r, cell]))
    cells = cells.at[r, cell].set(jnp.where(ok, time, cells[r, cell]))
    state = _set_jobs(state, which, jobs)
    return _set_room(state, which, cells, start, count.at[r].add(ok.astype(_I32))), do & full


def room_pop(state, which, row, do):
    """Take the head (oldest entry) of room ``row`` where ``do``."""
    cells, start, count = _room(state, which)
    if count.size == 0:
        return state
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    if cells.shape[-1] > 0:
        jobs = _jobs(state, which, count.size, cells.shape[-1])
        if jobs is not None:
            state = _set_jobs(state, which, jobs.at[r, start[r]].set(jnp.where(do, -1, jobs[r, start[r]])))
        cells = cells.at[r, start[r]].set(jnp.where(do, jnp.inf, cells[r, start[r]]))
        start = start.at[r].set(jnp.where(do, _wrap(start[r] + 1, cells.shape[-1]), start[r]))
    return _set_room(state, which, cells, start, count.at[r].add(-do.astype(_I32)))


def _shifted(where, rooms):
    """(cells, jobs) with entry ``pos`` of room ``r`` removed where ``do``: one masked pass (the shift
    of :func:`room_remove`); unchanged where not ``do``."""
    start, count, r, pos, do = where
    cells, jobs = rooms
    width = cells.shape[-1]
    cell = jnp.arange(width, dtype=_I32)
    unwrapped = jnp.where(cell >= start[r], cell, cell + width)  # start .. start + width - 1
    first = start[r] + pos
    last = start[r] + count[r] - 1
    moved = (unwrapped >= first) & (unwrapped < last)  # takes the next cell
    in_row = (jnp.arange(cells.shape[0]) == r)[:, None] & do

    # each cell's successor (the last cell's is cell 0); padding, then one select, fuses into a
    # single cheap pass where a wrapping concatenation of two slices does not
    def shift(a, empty):
        padded = jnp.concatenate([a[:, 1:], jnp.full((a.shape[0], 1), empty, a.dtype)], axis=1)
        after = jnp.where(cell == width - 1, a[:, :1], padded)
        return jnp.where(in_row & moved[None, :], after, jnp.where(in_row & (unwrapped == last)[None, :], empty, a))

    return shift(cells, jnp.inf), None if jobs is None else shift(jobs, -1)


def room_remove(state, which, row, pos, do):
    """Remove entry ``pos`` (0 = oldest) of room ``row`` where ``do``: the newer entries each move one
    cell toward the head. One masked pass over the whole family of rooms: selecting the row first
    (a gather, then a scatter back) measured slower on CPU, and so did a ring shift by concatenation."""
    cells, start, count = _room(state, which)
    if count.size == 0:
        return state
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    width = cells.shape[-1]
    if width > 0:
        jobs = _jobs(state, which, count.size, width)
        # abandonments are rare (well under 1% of events on the canonical instance): batched, the pass
        # runs only in the steps where some replica of the batch abandons from this family
        cells, jobs = skip_unless(do, _shifted, (start, count, r, pos, do), (cells, jobs))
        if jobs is not None:
            state = _set_jobs(state, which, jobs)
    return _set_room(state, which, cells, start, count.at[r].add(-do.astype(_I32)))
