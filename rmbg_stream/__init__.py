"""rmbg-stream: real-time background removal for video with RMBG-2.0 / BiRefNet."""

__version__ = "0.1.0"
