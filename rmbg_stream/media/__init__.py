"""Video files in and out with PyAV: threaded decoding, encoders, stream copy, looping video backgrounds."""
