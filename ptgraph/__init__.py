"""ptgraph: PruneTrain for any PyTorch model, through torch.fx channel-dependency analysis."""
from ptgraph.errors import UserError
from ptgraph.graph import Graph, trace

__all__ = ["Graph", "UserError", "trace"]
__version__ = "0.1.0"
