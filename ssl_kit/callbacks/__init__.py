"""Training callbacks: checkpoints, throughput, reconstructions, end-of-run evaluation."""

from ssl_kit.callbacks.checkpoint import RunCheckpoint, SafeCheckpointIO
from ssl_kit.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from ssl_kit.callbacks.monitor import ReconstructionGrid, Throughput
from ssl_kit.callbacks.online_knn import OnlineKNN
from ssl_kit.callbacks.report import EvalReport, KNNReport
from ssl_kit.callbacks.speed import SpeedUp

__all__ = [
    "RunCheckpoint", "SafeCheckpointIO", "NaNGuard", "NonFiniteLossError", "ReconstructionGrid", "Throughput",
    "EvalReport", "KNNReport", "OnlineKNN", "SpeedUp",
]
