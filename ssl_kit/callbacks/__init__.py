"""Training callbacks: checkpoints, throughput, reconstructions, online probes, end-of-run evaluation and pictures."""

from ssl_kit.callbacks.checkpoint import RunCheckpoint, SafeCheckpointIO
from ssl_kit.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from ssl_kit.callbacks.monitor import ReconstructionGrid, Throughput
from ssl_kit.callbacks.online_eval import OnlineEvalData
from ssl_kit.callbacks.online_knn import OnlineKNN
from ssl_kit.callbacks.online_linear import OnlineLinearProbe
from ssl_kit.callbacks.report import EvalReport, KNNReport
from ssl_kit.callbacks.show_report import ShowReport
from ssl_kit.callbacks.speed import SpeedUp

__all__ = [
    "RunCheckpoint", "SafeCheckpointIO", "NaNGuard", "NonFiniteLossError", "ReconstructionGrid", "Throughput",
    "EvalReport", "KNNReport", "OnlineEvalData", "OnlineKNN", "OnlineLinearProbe", "ShowReport", "SpeedUp",
]
