"""Built-in strategies, always registered: what a user tries first.

They live in ``workers.library``, one module per strategy ported from upstream algocline's
bundled packages (cot, sc, reflect, cove, panel, ucb, ...); importing this module registers
them all, so ``catalog.load`` (every worker) offers them whatever ``--import`` adds. All
are deterministic given their answers (see ``workers.context``), so any worker can replay
them.
"""

from __future__ import annotations

from . import library

__all__ = ["library"]
