"""The public key server: per-viewer playlists and content keys, for valid tokens only."""

from .app import create_app

__all__ = ["create_app"]
