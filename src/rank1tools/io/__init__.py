"""io layer: where tensors come from and go to. Nothing here knows about SVD."""

from .checkpoint import Checkpoint, open_checkpoint
from .compat import check_compatible
from .sources import is_hub_source, open_source
from .runs import RunCheckpoint, discover_run, select_steps
from .writer import ShardedWriter, TensorSpec

__all__ = ["Checkpoint", "open_checkpoint", "open_source", "is_hub_source", "check_compatible", "RunCheckpoint", "discover_run",
           "select_steps", "ShardedWriter", "TensorSpec"]
