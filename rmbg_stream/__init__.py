"""rmbg-stream: real-time background removal for video with RMBG-2.0 / BiRefNet.

Layout, each layer depending only on the ones below it:

- front ends, peers: `image` (still pictures), `transcode` (video files), `camera` (a local camera), `server/`
  (browser page, WebRTC, WebSocket); `cli` parses the command line and dispatches to one of them;
- `engine/`: batching, smoothing, compositing, and the model and device choice (`engine.setup`);
- `media/` (decoding, encoding, pictures) and `models/` (the network and its weights).
"""

from .tuning import passive_openmp

passive_openmp()  # before anything loads torch: see tuning.py

__version__ = "0.1.0"
