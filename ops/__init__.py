"""Multi-scale deformable attention: the op, its PyTorch references and the attention module."""
from .attention import MSDeformAttn
from .dispatch import ms_deform_attn
from .reference import ms_deform_attn_gather, ms_deform_attn_pytorch

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_gather", "ms_deform_attn_pytorch"]
