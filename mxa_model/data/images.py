"""Reading radiographs (JPEG, PNG, DICOM) as one-channel uint8 tensors: one byte a pixel from the file to
the training device, where they become float (:func:`mxa_model.data.transforms.normalize`)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

DICOM_SUFFIXES = (".dcm", ".dicom")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageReadError(OSError, ValueError):
    """An image file that cannot be read: missing, truncated, corrupt, or without pixel data.

    ``str(error)`` is one line, ``"<path>: <reason>"``; ``path`` and ``reason`` are kept as attributes.
    With ``reason`` left out the first argument is the whole message: that is how a DataLoader
    re-raises a worker's error (``type(error)(message)``), which so keeps its type.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        self.path = path
        self.reason = reason
        super().__init__(str(path) if reason is None else f"{path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read a radiograph as a uint8 tensor (1, H, W), 0 black, 255 white.

    JPEG through libjpeg-turbo (``torchvision.io.decode_jpeg``, colour converted to luminance), the
    fastest decoder on a CPU; PNG and whatever else Pillow reads through Pillow: 16-bit grayscale
    ("I;16" PNGs) rounded to 8 bits, colour images converted to luminance. DICOM (a ``.dcm`` /
    ``.dicom`` suffix, or the ``DICM`` magic at byte 128) goes through :func:`_dicom_pixels` and is
    rounded to 8 bits after its Modality and VOI LUTs (its window). Raises :class:`ImageReadError`
    naming the file for anything that cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageReadError(path, e.strerror or str(e)) from e
    is_dicom = path.suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"
    # Decoders (libjpeg, Pillow's plugins, pydicom and its pixel handlers) raise many exception types for
    # corrupt input (RuntimeError, OSError, ValueError, SyntaxError, struct.error, ...): all mean
    # "unreadable file".
    try:
        if is_dicom:
            return _to_uint8(_dicom_pixels(path, data))
        if data[:3] == _JPEG_MAGIC:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)
        return _pil_pixels(data)
    except ImageReadError:
        raise
    except Exception as e:
        kind = "DICOM" if is_dicom else "image"
        message = " ".join(str(e).split())  # one line, whatever the decoder wrote
        raise ImageReadError(path, f"cannot read {kind}: {type(e).__name__}: {message}") from e


def _to_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(1, H, W) uint8 from (H, W) values in [0, 1], rounded to the nearest level."""
    return torch.from_numpy(np.rint(pixels * 255.0).astype(np.uint8)).unsqueeze(0)


def _pil_pixels(data: bytes) -> torch.Tensor:
    """(1, H, W) uint8 from the bytes of a file Pillow reads."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now, so that a truncated file fails here (Image.open is lazy)
        if image.mode in _SIXTEEN_BIT_MODES:
            # Pillow keeps 16-bit grayscale as "I;16*" (older versions: "I", 32-bit): scale by 2**16 - 1
            return _to_uint8(np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0))
        if image.mode != "L":
            image = image.convert("L")  # colour, palette, 1-bit, with alpha: to 8-bit luminance
        return torch.from_numpy(np.array(image, dtype=np.uint8)).unsqueeze(0)


def _dicom_pixels(path: Path, data: bytes) -> np.ndarray:
    """(H, W) float64 in [0, 1] from the bytes ``data`` of the single-frame grayscale DICOM file ``path``,
    white = dense, as a viewer shows it.

    The file must be in the DICOM file format (preamble and ``DICM`` magic), as files are since 1993.

    The stored values go through the display pipeline's grayscale steps with pydicom's own functions: the
    Modality LUT (Rescale Slope / Intercept, or a LUT), then the VOI LUT (Window Center / Width, or a LUT;
    without one the values pass unchanged). The output range is what the lowest and highest storable
    values (``[0, 2**BitsStored - 1]``, signed ``[-2**(BitsStored-1), 2**(BitsStored-1) - 1]``, or the
    image's own min..max when values exceed it) become through the same steps, and it is mapped to
    [0, 1]: values outside a window saturate, and low Modality LUT outputs are dark (so a negative slope
    inverts the stored values). MONOCHROME1 (white = 0) is inverted last, over that range, so that dense
    tissue is bright, as in MONOCHROME2.
    """
    import pydicom  # here, not at the top: the commands that read no images (bench, backends) run without it

    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    # the bytes load_image read (the file is not read twice); not force=True: that would parse any bytes
    # as some data set
    ds = pydicom.dcmread(io.BytesIO(data))
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(path, f"unsupported DICOM photometric interpretation {photometric!r}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames) is not supported")
    stored = ds.pixel_array  # in its integer type: pydicom's LUTs index with it
    for name in ("RescaleSlope", "RescaleIntercept"):
        if name in ds and ds[name].value is None:  # empty: no rescale (pydicom would multiply by None)
            del ds[name]

    bits = int(ds.BitsStored)  # decoding needs it, so it is there
    signed = ds.get("PixelRepresentation", 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if stored.min() < low or stored.max() > high:
        # pydicom 3 clears the bits above BitsStored, pydicom 2 leaves them (overlays, headers that lie)
        low, high = int(stored.min()), int(stored.max())
    # the output range: the storable extremes through both steps, in the order of their modality values
    darkest, brightest = apply_voi_lut(np.sort(apply_modality_lut(np.array([low, high]), ds)), ds).astype(np.float64)
    shown = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    if brightest == darkest:
        pixels = np.zeros_like(shown)
    else:  # clipped: a non-monotonic LUT may leave the range its ends span
        pixels = np.clip((shown - darkest) / (brightest - darkest), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return pixels
