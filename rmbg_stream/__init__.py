"""rmbg-stream: real-time background removal for video with RMBG-2.0 / BiRefNet.

Layout, each layer depending only on the ones below it:

- front ends, peers: `image` (still pictures), `transcode` (video files), `camera` (a local camera), `server/`
  (browser page, WebRTC, WebSocket); `cli` parses the command line and dispatches to one of them;
- `engine/`: batching, smoothing, compositing, and the model and device choice (`engine.setup`);
- `media/` (decoding, encoding, pictures) and `models/` (the network and its weights).
"""

import os

# OpenMP threads that spin while waiting make every small torch op 10-50x slower as soon as another
# process (a browser, an encoder, a second session) holds a core; sleeping waiters cost almost nothing.
# It has to be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
