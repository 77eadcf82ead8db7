"""Waiting rooms of the event engines: per class, a ring of the waiting jobs' entry times.

Each class's room (the prefill queue, and each decode buffer) is a ring: ``start`` is the cell of the
oldest entry and the count is stored, so the live entries are cells start, start + 1, ... (mod width),
oldest first, and reading a head is O(1). Entries arrive in time order, so a push writes the cell after
the newest and taking the head advances ``start``: both O(1). Only an abandonment (a uniformly chosen
entry) moves cells: the newer entries shift one cell toward the head, a masked pass over the room.
Cells past the count hold +inf (a state holds no stale values).

The entry times serve one purpose: FCFS *across* classes (which class's head is oldest). With one class
there is nothing to order (and abandonment, memoryless, needs no ages), so a one-class model keeps
rooms of width 0: the counts alone, no capacity, never a lost job, and no O(room) shift. A policy
without decode buffers has a buffer family of zero rows: every operation on it does nothing.

The functions take any pytree with the family's three fields (``ROOMS``) and return it updated.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

_I32 = jnp.int32
ROOMS = {"queue": ("queue", "queue_start", "q_p"), "buffers": ("buffers", "buffer_start", "q_d")}


def room_width(spec) -> int:
    """Entry-time cells per class: ``spec.room``, or 0 (counts only) for a one-class model."""
    return 0 if spec.num_classes == 1 else spec.room


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


def room_push(state, which, row, time, do):
    """Append ``time`` to room ``row`` where ``do`` (row < 0: nothing); returns (state, lost), lost
    meaning the room was full (or the family has no rooms)."""
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
    cells = cells.at[r, cell].set(jnp.where(ok, time, cells[r, cell]))
    return _set_room(state, which, cells, start, count.at[r].add(ok.astype(_I32))), do & full


def room_pop(state, which, row, do):
    """Take the head (oldest entry) of room ``row`` where ``do``."""
    cells, start, count = _room(state, which)
    if count.size == 0:
        return state
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    if cells.shape[-1] > 0:
        cells = cells.at[r, start[r]].set(jnp.where(do, jnp.inf, cells[r, start[r]]))
        start = start.at[r].set(jnp.where(do, _wrap(start[r] + 1, cells.shape[-1]), start[r]))
    return _set_room(state, which, cells, start, count.at[r].add(-do.astype(_I32)))


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
        cell = jnp.arange(width, dtype=_I32)
        unwrapped = jnp.where(cell >= start[r], cell, cell + width)  # start .. start + width - 1
        first = start[r] + pos
        last = start[r] + count[r] - 1
        moved = (unwrapped >= first) & (unwrapped < last)  # takes the next cell
        in_row = (jnp.arange(cells.shape[0]) == r)[:, None] & do
        # each cell's successor (the last cell's is cell 0); padding, then one select, fuses into a
        # single cheap pass where a wrapping concatenation of two slices does not
        padded = jnp.concatenate([cells[:, 1:], jnp.full((cells.shape[0], 1), jnp.inf, cells.dtype)], axis=1)
        after = jnp.where(cell == width - 1, cells[:, :1], padded)
        cells = jnp.where(in_row & moved[None, :], after, jnp.where(in_row & (unwrapped == last)[None, :], jnp.inf, cells))
    return _set_room(state, which, cells, start, count.at[r].add(-do.astype(_I32)))
