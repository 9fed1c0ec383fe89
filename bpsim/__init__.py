"""bpsim: branch-predicted speculative decoding, recorded, fitted, replayed and exported."""

__version__ = "0.1.0"
