"""Two threads on one C kernel call (`team.h`): the thread calling the kernel with `team=` and a member calling
`team.join()` from another thread, whenever it gets there. Both take the call's chunks in turn, so a member that
comes late or not at all slows nobody down. retrieval.lend lends an idle core to a serving request this way."""

from __future__ import annotations

import ctypes
from typing import Callable


class TeamState(ctypes.Structure):   # team.h's team_t
    _fields_ = [("state", ctypes.c_int), ("chunks", ctypes.c_int * 2), ("call", ctypes.c_void_p)]


class Team:
    """One kernel call's team, given the kernel's member entry point (`join(team*) -> int`, 1 when it took part)
    and its close (`close(team*)`). One call per team: a new team is ready (`reset()` readies a used one), and
    `close()` follows its call on every path (a member waiting to join returns then)."""

    def __init__(self, join: Callable[[int], int], close: Callable[[int], None]):
        self._join, self._close = join, close
        self._state = TeamState()
        self.ref = ctypes.addressof(self._state)

    def reset(self) -> None:
        ctypes.memset(self.ref, 0, ctypes.sizeof(TeamState))

    def join(self) -> bool:
        """Work on the open call until it is done (True), or return False at once if it was closed first."""
        return bool(self._join(self.ref))

    def close(self) -> None:
        """No member joins after this; one that joined has finished."""
        self._close(self.ref)

    @property
    def chunks(self) -> tuple[int, int]:
        """Chunks of the last call taken by its caller and by the member."""
        return self._state.chunks[0], self._state.chunks[1]
