"""Pictures of what an encoder learned: PCA of patch features, t-SNE of pooled features,
MAE/FCMAE reconstructions, ViT attention, and the HTML report gathering them (``python -m ssl_kit show``)."""

from ssl_kit.pictures.attention import attention_maps, attention_picture
from ssl_kit.pictures.embedding import embedding_picture, pooled_features, tsne_2d
from ssl_kit.pictures.pca import patch_features, pca_picture, pca_rgb
from ssl_kit.pictures.reconstructions import reconstruction_picture, reconstructor_from_checkpoint
from ssl_kit.pictures.report import ReportInputs, write_report

__all__ = [
    "attention_maps", "attention_picture", "embedding_picture", "pooled_features", "tsne_2d", "patch_features",
    "pca_picture", "pca_rgb", "reconstruction_picture", "reconstructor_from_checkpoint", "ReportInputs", "write_report",
]
