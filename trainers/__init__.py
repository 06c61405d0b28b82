"""Training loops that use the passes: PruneTrain."""
from ptgraph.trainers.prunetrain import PruneTrain, Reconfiguration

__all__ = ["PruneTrain", "Reconfiguration"]
