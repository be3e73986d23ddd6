"""The engine: batching, device pipeline, temporal smoothing, compositing."""
