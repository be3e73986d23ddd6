"""Live server: the browser page, WebRTC and WebSocket sessions sharing one engine, an OBS source, metrics."""
