"""Official-format V4 checkpoints: layout, synthetic writer, lazy reader, disk -> model conversion."""

from parity.checkpoint.reader import Checkpoint, Selection, build_model, load_params
from parity.checkpoint.writer import write_checkpoint

__all__ = ["Checkpoint", "Selection", "build_model", "load_params", "write_checkpoint"]
