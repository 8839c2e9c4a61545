"""mstore: a Git-style, content-addressed store for model weights."""
__version__ = "0.1.0"
