"""Playlists rendered once per version, handed to each viewer with the viewer's own values.

A version's playlists are immutable, and what one viewer's copy holds of its own is the query
string its key (and variant) URIs carry and the signature its segment URIs carry. So each
playlist is rendered once with stand-ins for those two, and a request replaces the stand-ins:
two passes of ``str.replace`` instead of formatting every line of a film's playlist (a
two-hour rendition has ~1 200 segments: milliseconds per request, once per viewer and
rendition at the start of a premiere).

The stand-ins hold a NUL and random bytes chosen per process, so no playlist text (titles
come from the source's own tags) can hold one by chance or by design.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

#: Rendered playlists kept at most (least recently used first out). A long film's variant is
#: ~150 KB with signed segment URIs, so this bounds the cache near 40 MB; a typical library's
#: hot versions and renditions fit many times over.
MAX_TEMPLATES = 256

#: The stand-ins of one process: the viewer's query string, and its segments' signature.
QUERY = f"\x00q{secrets.token_hex(8)}\x00"
SIGNATURE = f"\x00s{secrets.token_hex(8)}\x00"

Render = Callable[[str, str], str]


class PlaylistTemplates:
    """A bounded LRU of playlists rendered with the stand-ins, by what they depend on."""

    def __init__(self, *, max_templates: int = MAX_TEMPLATES) -> None:
        if max_templates < 1:
            raise ValueError("max_templates must be at least 1")
        self.max_templates = max_templates
        self._templates: OrderedDict[Hashable, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._templates)

    def render(self, key: Hashable, render: Render, query: str, signature: str = "") -> str:
        """``render(query, signature)``, from the template cached under ``key``: ``key``
        must name everything else the text depends on (asset, version, rendition, mode), and
        ``render`` must place its two arguments into the text as they are."""
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
        if template is None:
            template = render(QUERY, SIGNATURE)
            with self._lock:
                self._templates[key] = template
                if len(self._templates) > self.max_templates:
                    self._templates.popitem(last=False)
        return template.replace(QUERY, query).replace(SIGNATURE, signature)
