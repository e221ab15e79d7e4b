"""EfficientViT's whole windowed cascaded group attention at inference, BatchNorms folded."""

from .api import cascaded_attention_infer
from .reference import cascaded_attention_infer_ref

__all__ = ["cascaded_attention_infer", "cascaded_attention_infer_ref"]
