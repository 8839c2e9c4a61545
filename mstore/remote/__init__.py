"""Sharing models between stores: remotes.json, transports over fsspec URLs, push, pull and
clone. Torch-free and typer-free; builds on mstore.store only.
"""
