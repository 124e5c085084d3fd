"""Layer-streamed models: one block's weights in memory at a time (`weights`), built like `build_model` (`build`),
with the process's memory measured (`memory`)."""

from parity.stream.build import build_streamed
from parity.stream.weights import Streamer, StreamStats, block_bytes

__all__ = ["StreamStats", "Streamer", "block_bytes", "build_streamed"]
