"""The MXA branch after the ROI predictor: ROI resample, channel attention, spatial attention."""

from .api import mxa_branch
from .reference import ROI_MODES, channel_spatial_attention, crop_resize_loop, mxa_branch_ref, roi_resample, snap_boxes

__all__ = ["ROI_MODES", "channel_spatial_attention", "crop_resize_loop", "mxa_branch", "mxa_branch_ref",
           "roi_resample", "snap_boxes"]
