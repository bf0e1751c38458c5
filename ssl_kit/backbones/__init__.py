"""Encoders: timm models plus the masked forwards the methods need."""

from ssl_kit.backbones.convnextv2_sparse import create_convnextv2, forward_sparse
from ssl_kit.backbones.teacher import FrozenTeacher, TeacherConfig
from ssl_kit.checkpoints.timm_names import check_timm_name
from ssl_kit.backbones.vit import create_vit, forward_mask_token, forward_visible, sincos_pos_embed_2d

__all__ = [
    "create_vit", "forward_visible", "forward_mask_token", "sincos_pos_embed_2d", "check_timm_name",
    "create_convnextv2", "forward_sparse", "FrozenTeacher", "TeacherConfig",
]
