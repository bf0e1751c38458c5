"""Training callbacks: checkpoints, throughput, reconstructions, end-of-run evaluation."""

from ssl_kit.callbacks.checkpoint import RunCheckpoint, SafeCheckpointIO
from ssl_kit.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from ssl_kit.callbacks.monitor import ReconstructionGrid, Throughput
from ssl_kit.callbacks.report import KNNReport

__all__ = ["RunCheckpoint", "SafeCheckpointIO", "NaNGuard", "NonFiniteLossError", "ReconstructionGrid", "Throughput", "KNNReport"]
