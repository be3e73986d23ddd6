"""Video backgrounds: the next frame on every call, from the start again at the end."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from .reader import MediaError, display_rotation, io_threads, open_input, upright


class LoopingVideo:
    """`read()` returns the next frame as H x W x 3 uint8 RGB (upright), looping forever.

    One frame per call, whatever the source's frame rate: a background is a texture, not a clock. Decoding
    happens in the caller's thread (the engine's producer side), one small frame at a time.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.rotation: int | None = None
        self.loops = 0
        self._open()
        self.read()  # fail now, not in the middle of a transcode, if nothing decodes
        self._rewind()

    def _open(self) -> None:
        self.container = open_input(self.path)
        if not self.container.streams.video:
            self.container.close()
            raise MediaError(f"{self.path}: no video stream in the background video")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.stream.thread_count = io_threads()
        self._frames = self.container.decode(self.stream)

    def _rewind(self) -> None:
        try:
            self.container.seek(0, stream=self.stream)
            self._frames = self.container.decode(self.stream)
        except av.error.FFmpegError:  # not seekable (some GIFs, raw streams): start over from the file
            self.container.close()
            self._open()

    def read(self) -> np.ndarray:
        for _ in range(2):
            try:
                frame = next(self._frames, None)
            except av.error.FFmpegError as exc:
                raise MediaError(f"{self.path}: cannot decode the background video ({exc})") from None
            if frame is not None:
                if self.rotation is None:
                    self.rotation = display_rotation(frame, self.stream)
                return upright(frame.to_ndarray(format="rgb24"), self.rotation)
            self._rewind()
            self.loops += 1
        raise MediaError(f"{self.path}: the background video has no decodable frames")

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
