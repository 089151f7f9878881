"""odkd: distil large SSD detectors into small SSDLite students."""

__version__ = "0.1.0"
