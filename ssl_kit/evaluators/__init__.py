"""Evaluators: frozen-feature k-NN, linear probe, fine-tuning."""

from ssl_kit.evaluators.features import extract_features
from ssl_kit.evaluators.finetune import FineTune
from ssl_kit.evaluators.knn import knn_accuracy, knn_predict
from ssl_kit.evaluators.linear import LinearProbe

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "LinearProbe", "FineTune"]
