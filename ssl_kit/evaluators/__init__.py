"""Evaluators: frozen-feature k-NN, linear probe, fine-tuning."""

from ssl_kit.evaluators.features import extract_features
from ssl_kit.evaluators.finetune import FineTune
from ssl_kit.evaluators.knn import knn_accuracy, knn_predict
from ssl_kit.evaluators.linear import LinearProbe
from ssl_kit.checkpoints.load import load_encoder

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "load_encoder", "LinearProbe", "FineTune"]
