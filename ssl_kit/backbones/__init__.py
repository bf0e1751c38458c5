"""Encoders: timm models plus the masked forwards the methods need."""

from ssl_kit.backbones.teacher import FrozenTeacher, TeacherConfig
from ssl_kit.backbones.vit import create_vit, forward_visible, sincos_pos_embed_2d

__all__ = ["FrozenTeacher", "TeacherConfig", "create_vit", "forward_visible", "sincos_pos_embed_2d"]
