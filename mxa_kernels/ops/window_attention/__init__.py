"""One head of EfficientViT's windowed attention with a learned relative-position bias."""

from .api import window_attention
from .reference import merge_windows, partition_windows, window_attention_ref

__all__ = ["merge_windows", "partition_windows", "window_attention", "window_attention_ref"]
