"""Strategies ported from upstream algocline's bundled packages, one module each.

Importing this package registers them all (``workers.builtin`` does, so every worker offers
them). Each keeps its package's inputs, defaults, questions and result fields; where
upstream asks independent questions one after another, the port asks them in one batch, as
its docstring says. Add a strategy with one ``from . import <module> as <module>`` line
below (the alias tells the linters the import is for its registration, not unused).
"""

from . import calibrate as calibrate
from . import cot as cot
from . import cove as cove
from . import decompose as decompose
from . import factscore as factscore
from . import panel as panel
from . import reflect as reflect
from . import sc as sc
from . import tot as tot
from . import triad as triad
from . import ucb as ucb
from . import verify_select as verify_select
