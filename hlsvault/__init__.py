"""hlsvault: private HLS. Encrypted segments on any CDN, keys only for authorised viewers."""

__version__ = "0.1.0"
