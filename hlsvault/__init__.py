"""hlsvault: private HLS — AES-128 encrypted segments on any CDN, keys only for authorised viewers."""

__version__ = "0.1.0"
