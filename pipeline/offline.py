"""The offline bundle: one version's variant playlists and content keys, as one JSON document.

An app that downloads a stream to watch later (iOS ``AVAssetDownloadTask``, a Media3 download)
cannot ask the key server for keys in flight: it stores them with the stream. The bundle's
playlists name each key with :data:`pipeline.layout.OFFLINE_KEY_SCHEME` URIs
(``hlsvault-key://<asset>/<version>/<index>``), which no player fetches by itself, so that the
app's resource loader answers them from its own secure storage; segment URIs point at the CDN
(signed when the deployment signs CDN access).

    {"asset", "version", "expires_at", "key_rotation_segments",
     "renditions": [{"name", "media", "group", "language", "width", "height", "bandwidth",
                     "codecs", "playlist"}],

Every rendition of the version is there, the audio group's and the subtitles' too (``media``
"audio" or "subtitles", in the ``group`` its video renditions name); an fMP4 playlist names its
clear init segment on the CDN.
     "keys": {"<index>": "<base64 of the 16 key bytes>"}}
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from functools import partial
from typing import Any

from . import layout
from .playlists import AssetVersion, PublishedSegment, RenditionEntry, render_variant

SegmentUri = Callable[[RenditionEntry, PublishedSegment], str]
InitUri = Callable[[RenditionEntry, str], str]


def offline_bundle(
    described: AssetVersion, keys: dict[int, bytes], *, segment_uri: SegmentUri,
    init_uri: InitUri, expires_at: int,
) -> dict[str, Any]:
    """The bundle of ``described`` with ``keys`` (index → key bytes, every index it uses)."""
    asset, version = described.asset, described.version
    renditions = []

    def key_uri(index: int) -> str:
        return layout.offline_key_uri(asset, version, index)

    for rendition in described.renditions:
        text = render_variant(
            described, rendition, segment_uri=partial(segment_uri, rendition), key_uri=key_uri,
            init_uri=partial(init_uri, rendition),
        )
        renditions.append({
            "name": rendition.name, "media": rendition.media, "group": rendition.group,
            "language": rendition.language, "width": rendition.width,
            "height": rendition.height, "bandwidth": rendition.bandwidth,
            "codecs": rendition.codecs, "playlist": text,
        })
    return {
        "asset": asset,
        "version": version,
        "expires_at": expires_at,
        "key_rotation_segments": described.key_rotation_segments,
        "renditions": renditions,
        "keys": {str(i): base64.b64encode(key).decode() for i, key in sorted(keys.items())},
    }


def key_indices(described: AssetVersion) -> list[int]:
    return sorted({segment.key for r in described.renditions for segment in r.segments})
