"""augserver: distributed AugMix data loading (server side; never imports torch)."""

__version__ = "0.1.0"
