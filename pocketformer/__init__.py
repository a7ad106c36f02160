"""pocketformer: compress a trained transformer, export it for phones and edge boxes, and measure what it costs."""

__version__ = "0.1.0"
