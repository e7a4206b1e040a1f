"""A playlist checker of the tests' own: the RFC 8216 rules hlsvault's playlists must keep,
beyond what the ``m3u8`` package's parser checks (it accepts nearly anything).

    check_playlist(text) -> list of problems (empty: the playlist keeps every rule)

Master playlists: EXT-X-VERSION once; every EXT-X-STREAM-INF with BANDWIDTH (and
AVERAGE-BANDWIDTH not above it), CODECS and a URI line; EXT-X-MEDIA with TYPE, GROUP-ID and
NAME, a URI where the TYPE needs one, NAME unique and at most one DEFAULT=YES per group (and
exactly one in an AUDIO group, a rule of ours: a player then knows which track to start with),
AUTOSELECT=YES wherever DEFAULT=YES, DEFAULT/AUTOSELECT/FORCED either YES or NO, FORCED only
on subtitles, LANGUAGE a well-formed RFC 5646 tag; every AUDIO=, VIDEO=, SUBTITLES= and
CLOSED-CAPTIONS= of a variant names a group of that TYPE, and once the master has a SUBTITLES
group every video variant (one with RESOLUTION) names one; every EXT-X-I-FRAME-STREAM-INF with
BANDWIDTH (AVERAGE-BANDWIDTH not above it), RESOLUTION, CODECS and a URI attribute, and no URI
line after it (RFC 8216 4.3.4.3); no media tags.

Media playlists: EXT-X-TARGETDURATION once, each EXTINF rounded to the nearest integer within
it; EXT-X-VERSION once and at least what the features used need (IV: 2, decimal EXTINF: 3,
EXT-X-I-FRAMES-ONLY: 4, EXT-X-MAP: 6); EXT-X-I-FRAMES-ONLY at most once; every EXTINF
followed by a URI; EXT-X-KEY with METHOD, a URI unless NONE, an IV
of 32 hex digits; an EXT-X-MAP under an AES-128 key carries the key's IV (RFC 8216 4.3.2.5);
VOD ends with EXT-X-ENDLIST; no master tags.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterator
from urllib.parse import urljoin

#: quoted-string values may hold commas, so attributes are split by this, not by ",".
_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"\r\n]*"|[^",]*)')
MEDIA_TAGS = ("#EXTINF", "#EXT-X-TARGETDURATION", "#EXT-X-MEDIA-SEQUENCE", "#EXT-X-KEY",
              "#EXT-X-MAP", "#EXT-X-ENDLIST", "#EXT-X-PLAYLIST-TYPE", "#EXT-X-BYTERANGE",
              "#EXT-X-I-FRAMES-ONLY")
MASTER_TAGS = ("#EXT-X-STREAM-INF", "#EXT-X-MEDIA:", "#EXT-X-I-FRAME-STREAM-INF",
               "#EXT-X-SESSION-KEY", "#EXT-X-SESSION-DATA")
MEDIA_TYPES = ("AUDIO", "VIDEO", "SUBTITLES", "CLOSED-CAPTIONS")
#: RFC 5646 as HLS uses it: a 2-3 letter language (or 4-8 letters), then subtags.
_LANGUAGE = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")
_GROUP_REFERENCES = {"AUDIO": "AUDIO", "VIDEO": "VIDEO", "SUBTITLES": "SUBTITLES",
                     "CLOSED-CAPTIONS": "CLOSED-CAPTIONS"}


def attributes(line: str) -> dict[str, str]:
    """The attribute list of a tag line, quoted values unquoted."""
    body = line.split(":", 1)[1] if ":" in line else ""
    return {name: value.strip('"') for name, value in _ATTRIBUTE.findall(body)}


def is_master(text: str) -> bool:
    return any(line.startswith(MASTER_TAGS) for line in text.splitlines())


def check_playlist(text: str) -> list[str]:
    """Every rule ``text`` breaks, in words; empty when it keeps them all."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "#EXTM3U":
        return ["the first line is not #EXTM3U"]
    problems = _check_version_tag(lines)
    if is_master(text):
        problems += _check_master(lines)
    else:
        problems += _check_media(lines)
    return problems


def _check_version_tag(lines: list[str]) -> list[str]:
    versions = [line for line in lines if line.startswith("#EXT-X-VERSION:")]
    if len(versions) != 1:
        return [f"EXT-X-VERSION appears {len(versions)} times; once is required here"]
    return []


def _version(lines: list[str]) -> int:
    for line in lines:
        if line.startswith("#EXT-X-VERSION:"):
            return int(line.split(":", 1)[1])
    return 1


def _check_master(lines: list[str]) -> list[str]:
    problems = [f"media tag {line.split(':')[0]} in a master playlist"
                for line in lines if line.startswith(MEDIA_TAGS)]
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for line in lines:
        if not line.startswith("#EXT-X-MEDIA:"):
            continue
        media = attributes(line)
        kind, group, name = media.get("TYPE"), media.get("GROUP-ID"), media.get("NAME")
        if kind not in MEDIA_TYPES:
            problems.append(f"EXT-X-MEDIA TYPE {kind!r} is not one of {', '.join(MEDIA_TYPES)}")
            continue
        if not group or not name:
            problems.append(f"EXT-X-MEDIA of TYPE {kind} without GROUP-ID or NAME")
            continue
        if kind == "SUBTITLES" and "URI" not in media:
            problems.append(f"SUBTITLES rendition {name!r} has no URI")
        if kind == "CLOSED-CAPTIONS" and "URI" in media:
            problems.append(f"CLOSED-CAPTIONS rendition {name!r} has a URI")
        if media.get("DEFAULT") == "YES" and media.get("AUTOSELECT", "YES") != "YES":
            problems.append(f"rendition {name!r} is DEFAULT=YES without AUTOSELECT=YES")
        if "FORCED" in media and kind != "SUBTITLES":
            problems.append(f"FORCED on {kind} rendition {name!r}")
        for flag in ("DEFAULT", "AUTOSELECT", "FORCED"):
            if flag in media and media[flag] not in ("YES", "NO"):
                problems.append(f"rendition {name!r} has {flag}={media[flag]!r}, not YES or NO")
        if "LANGUAGE" in media and not _LANGUAGE.fullmatch(media["LANGUAGE"]):
            problems.append(f"rendition {name!r} has LANGUAGE {media['LANGUAGE']!r}, not an "
                            "RFC 5646 tag")
        groups.setdefault((kind, group), []).append(media)
    for (kind, group), members in groups.items():
        names = [m["NAME"] for m in members]
        if len(set(names)) != len(names):
            problems.append(f"{kind} group {group!r} repeats a NAME: {names}")
        defaults = sum(1 for m in members if m.get("DEFAULT") == "YES")
        if defaults > 1:
            problems.append(f"{kind} group {group!r} has {defaults} DEFAULT=YES renditions")
        if kind == "AUDIO" and defaults != 1:
            problems.append(f"AUDIO group {group!r} has no DEFAULT=YES rendition")
    variants = 0
    for index, line in enumerate(lines):
        if not line.startswith("#EXT-X-STREAM-INF:"):
            continue
        variants += 1
        stream = attributes(line)
        if not stream.get("BANDWIDTH", "").isdigit():
            problems.append(f"EXT-X-STREAM-INF without a decimal BANDWIDTH: {line[:80]}")
        elif stream.get("AVERAGE-BANDWIDTH", "0").isdigit() and \
                int(stream.get("AVERAGE-BANDWIDTH", "0")) > int(stream["BANDWIDTH"]):
            problems.append(f"AVERAGE-BANDWIDTH above BANDWIDTH: {line[:80]}")
        if not stream.get("CODECS"):
            problems.append(f"EXT-X-STREAM-INF without CODECS: {line[:80]}")
        has_subtitles = any(kind == "SUBTITLES" for kind, _ in groups)
        if has_subtitles and "RESOLUTION" in stream and "SUBTITLES" not in stream:
            problems.append(f"video variant without SUBTITLES= in a master with subtitles: "
                            f"{line[:80]}")
        for attribute, kind in _GROUP_REFERENCES.items():
            group = stream.get(attribute)
            if group is None or (kind == "CLOSED-CAPTIONS" and group == "NONE"):
                continue
            if (kind, group) not in groups:
                problems.append(f"{attribute}={group!r} names no {kind} group of EXT-X-MEDIA")
        following = lines[index + 1] if index + 1 < len(lines) else "#"
        if following.startswith("#"):
            problems.append(f"EXT-X-STREAM-INF not followed by a URI: {line[:80]}")
    if variants == 0:
        problems.append("a master playlist without EXT-X-STREAM-INF")
    return problems + _check_iframe_streams(lines)


def _check_iframe_streams(lines: list[str]) -> list[str]:
    problems = []
    for index, line in enumerate(lines):
        if not line.startswith("#EXT-X-I-FRAME-STREAM-INF:"):
            continue
        stream = attributes(line)
        if not stream.get("BANDWIDTH", "").isdigit():
            problems.append(f"EXT-X-I-FRAME-STREAM-INF without a decimal BANDWIDTH: {line[:80]}")
        elif stream.get("AVERAGE-BANDWIDTH", "0").isdigit() and \
                int(stream.get("AVERAGE-BANDWIDTH", "0")) > int(stream["BANDWIDTH"]):
            problems.append(f"I-frame AVERAGE-BANDWIDTH above BANDWIDTH: {line[:80]}")
        for required in ("URI", "CODECS", "RESOLUTION"):
            if not stream.get(required):
                problems.append(f"EXT-X-I-FRAME-STREAM-INF without {required}: {line[:80]}")
        if not re.fullmatch(r"[0-9]+x[0-9]+", stream.get("RESOLUTION", "0x0")):
            problems.append(f"I-frame RESOLUTION {stream.get('RESOLUTION')!r} is not WxH")
        following = lines[index + 1] if index + 1 < len(lines) else "#"
        if not following.startswith("#"):
            problems.append(f"EXT-X-I-FRAME-STREAM-INF followed by a URI line: {following[:80]}")
    return problems


def _check_media(lines: list[str]) -> list[str]:
    problems = [f"master tag {line.split(':')[0]} in a media playlist"
                for line in lines if line.startswith(MASTER_TAGS)]
    targets = [line for line in lines if line.startswith("#EXT-X-TARGETDURATION:")]
    if len(targets) != 1:
        return [*problems, f"EXT-X-TARGETDURATION appears {len(targets)} times; once is required"]
    target = int(targets[0].split(":", 1)[1])
    needed = {1: "plain tags"}
    key: dict[str, str] = {"METHOD": "NONE"}
    segments = 0
    iframes_only = lines.count("#EXT-X-I-FRAMES-ONLY")
    if iframes_only:
        needed[4] = "EXT-X-I-FRAMES-ONLY"
    if iframes_only > 1:
        problems.append(f"EXT-X-I-FRAMES-ONLY appears {iframes_only} times")
    for index, line in enumerate(lines):
        if line.startswith("#EXT-X-KEY:"):
            key = attributes(line)
            method = key.get("METHOD")
            if method is None:
                problems.append("EXT-X-KEY without METHOD")
            elif method != "NONE" and "URI" not in key:
                problems.append(f"EXT-X-KEY METHOD={method} without URI")
            if "IV" in key:
                needed[2] = "the IV attribute"
                if not re.fullmatch(r"0[xX][0-9A-Fa-f]{32}", key["IV"]):
                    problems.append(f"EXT-X-KEY IV {key['IV']!r} is not 0x and 32 hex digits")
        elif line.startswith("#EXT-X-MAP:"):
            needed[6] = "EXT-X-MAP"
            if "URI" not in attributes(line):
                problems.append("EXT-X-MAP without URI")
            if key.get("METHOD") == "AES-128" and "IV" not in key:
                problems.append("EXT-X-MAP under an AES-128 EXT-X-KEY without IV "
                                "(RFC 8216 4.3.2.5): the init segment's IV is unknown")
        elif line.startswith("#EXTINF:"):
            segments += 1
            raw = line.split(":", 1)[1].split(",", 1)[0]
            duration = float(raw)
            if "." in raw:
                needed[3] = "decimal EXTINF durations"
            if math.floor(duration + 0.5) > target:
                problems.append(f"EXTINF {raw} rounds above EXT-X-TARGETDURATION {target}")
            following = lines[index + 1] if index + 1 < len(lines) else "#"
            if following.startswith("#"):
                problems.append(f"EXTINF not followed by a URI (line {index + 1})")
    declared = _version(lines)
    required = max(needed)
    if declared < required:
        problems.append(f"EXT-X-VERSION {declared} is below {required}, which "
                        f"{needed[required]} need")
    if segments == 0:
        problems.append("a media playlist without segments")
    if "#EXT-X-PLAYLIST-TYPE:VOD" in lines and lines[-1] != "#EXT-X-ENDLIST":
        problems.append("a VOD playlist that does not end with EXT-X-ENDLIST")
    return problems


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def crawl(master_url: str) -> Iterator[tuple[str, str]]:
    """The master playlist at ``master_url`` and every media playlist it names (variants,
    EXT-X-MEDIA renditions and I-frame streams, each once), as ``(url, text)``."""
    master = fetch(master_url)
    yield master_url, master
    seen: set[str] = set()
    lines = master.splitlines()
    for index, line in enumerate(lines):
        uri = None
        if line.startswith(("#EXT-X-MEDIA:", "#EXT-X-I-FRAME-STREAM-INF:")):
            uri = attributes(line).get("URI")
        elif line.startswith("#EXT-X-STREAM-INF:") and index + 1 < len(lines):
            uri = lines[index + 1].strip()
        if uri:
            absolute = urljoin(master_url, uri)
            if absolute not in seen:
                seen.add(absolute)
                yield absolute, fetch(absolute)


def assert_valid_hls(master_url: str) -> dict[str, str]:
    """Fail unless the master at ``master_url`` and every playlist it names keep the rules
    above and parse with the ``m3u8`` package; the playlists by URL."""
    import m3u8

    found = dict(crawl(master_url))
    for url, text in found.items():
        problems = check_playlist(text)
        assert problems == [], f"{url.split('?')[0]}: {problems}\n{text}"
        parsed = m3u8.loads(text, uri=url)
        assert parsed.is_variant == is_master(text), url.split("?")[0]
    return found
