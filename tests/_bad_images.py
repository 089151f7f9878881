"""Image files that are broken in ways a decoder does not always report."""

import cv2
import numpy as np


def noisy_jpeg(height: int = 60, width: int = 80) -> bytes:
    """A complete JPEG of noise (its image data is most of the file, so a cut lands in it)."""
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def undecodable_png(height: int, width: int) -> bytes:
    """A PNG whose header and end are intact (its size reads, the file is complete) but whose image data is
    damaged: only decoding finds out."""
    data = bytearray(cv2.imencode(".png", np.zeros((height, width, 3), np.uint8))[1].tobytes())
    start = data.find(b"IDAT") + 4
    data[start : start + 8] = bytes(range(1, 9))
    return bytes(data)
