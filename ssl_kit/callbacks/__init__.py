"""Training callbacks: checkpoints, throughput, reconstructions, end-of-run evaluation."""

from ssl_kit.callbacks.checkpoint import RunCheckpoint
from ssl_kit.callbacks.monitor import ReconstructionGrid, Throughput
from ssl_kit.callbacks.online_knn import OnlineKNN
from ssl_kit.callbacks.report import EvalReport, KNNReport
from ssl_kit.callbacks.speed import SpeedUp

__all__ = ["RunCheckpoint", "ReconstructionGrid", "Throughput", "EvalReport", "KNNReport", "OnlineKNN", "SpeedUp"]
