"""The sky simulator: raw 7DT nights with known truth (``gppy simulate``).

See ``README.md`` in this folder for the layout of a simulated night and every truth file.
"""

from gppy.sim.detector import Physics
from gppy.sim.night import simulate, write_master_archive
from gppy.sim.truth import SimTruth

__all__ = ["Physics", "SimTruth", "simulate", "write_master_archive"]
