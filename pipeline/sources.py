"""Sources: what a job's source may be, and how ffmpeg and ffprobe may open it.

A source is a local path, an http(s) URL or ``s3://bucket/key`` (read through a presigned
URL). Left to its defaults, ffmpeg lets the *content* of an input name further inputs: an HLS
playlist makes it fetch every URL listed (whatever the file is called), a concat list opens
every file it names, an image2 pattern reads a series of files. A source anyone can upload
could so send the workers' requests to internal hosts, such as the instance metadata service,
or have them read local files. Every source is therefore opened under two allow-lists:

- protocols: only what the source's kind needs (:data:`LOCAL_PROTOCOLS`,
  :data:`URL_PROTOCOLS`), so nothing the content names can leave that kind;
- demuxers: the self-contained containers hlsvault packages (:data:`SOURCE_DEMUXERS`). ffmpeg
  checks ``format_whitelist`` after detecting the format and before reading its header, which
  is where a playlist or list would start opening what it names: a refused source is never
  followed, not even by the probe. The segment stage names the demuxer the probe found
  (``-f``), so it cannot detect something else (an S3 object replaced between the stages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .aws import Outcome, botocore_errors, classify, describe, shared_client
from .errors import InvalidSource, TransientError
from .storage import is_s3_url, s3_parts, shown_url, url_scheme

#: A presigned source URL must outlive the longest ffmpeg run of the segment stage.
PRESIGN_EXPIRY_S = 12 * 3600

#: The demuxers a source may be read with, by ffmpeg name, and what users call them. Only
#: containers that carry their media inside themselves: a demuxer is added here only after
#: checking it opens nothing but its own input. (mov keeps external data references off, as
#: ffmpeg does by default: ``enable_drefs`` 0.)
SOURCE_DEMUXERS: dict[str, str] = {
    "mov": "MP4/MOV",  # ffprobe's format_name: mov,mp4,m4a,3gp,3g2,mj2
    "matroska": "Matroska/WebM",  # matroska,webm
    "mpegts": "MPEG-TS",
    "mpeg": "MPEG-PS",  # .mpg, .vob
    "avi": "AVI",
    "flv": "FLV",
}
#: A local file is read through ffmpeg's file protocol and nothing else.
LOCAL_PROTOCOLS = "file"
#: A URL needs HTTP(S) and what lies beneath: TLS, TCP, and httpproxy, which ffmpeg uses for an
#: https URL when http_proxy is set (a CONNECT tunnel to the URL's own host). Nothing that lets
#: content name another input (hls, concat, subfile, data, crypto, ftp, rtmp …).
URL_PROTOCOLS = "http,https,tls,tcp,httpproxy"

#: The URL schemes a source may have, written as here (lower case).
SOURCE_SCHEMES = ("s3", "http", "https")
#: How a message names a refused format, for the demuxers sources are most often mistaken for.
_REFUSED_KINDS = {
    "hls": "an HLS playlist",
    "dash": "a DASH manifest",
    "concat": "a concat list",
    "image2": "an image file pattern",
    "image2pipe": "an image",
    "tty": "text",
}


def split_s3_url(url: str, *, what: str = "source") -> tuple[str, str]:
    """The bucket and key of an ``s3://`` source or sidecar: the one place both must be
    there. :class:`~pipeline.errors.InvalidSource` naming ``what`` when either is missing."""
    bucket, key = s3_parts(url)
    if not bucket or not key:
        raise InvalidSource(f"{what} {url[:200]!r} is not of the form s3://bucket/key")
    return bucket, key


def s3_source_url(source: str, *, client: Any | None = None, check: bool = True) -> str:
    """Check an ``s3://`` source exists and is readable (unless ``check`` is False: a stage
    after the probe, which checked it); return a presigned GET URL for it."""
    bucket, key = split_s3_url(source)
    client = client if client is not None else shared_client()
    if not check:
        return _presigned(client, bucket, key)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except botocore_errors() as error:
        outcome = classify(error)
        if outcome is Outcome.NOT_FOUND:
            raise InvalidSource(
                f"source {source} not found; check the bucket and key (S3 keys are case-sensitive)"
            ) from None
        if outcome is Outcome.REFUSED:
            raise InvalidSource(
                f"source {source} is not readable by the worker's AWS credentials "
                f"({describe(error)}); check the bucket exists and grant s3:GetObject on it"
            ) from None
        raise TransientError(f"S3 error reading source {source}: {describe(error)}") from None
    if int(head.get("ContentLength", 0)) == 0:
        raise InvalidSource(f"source {source} is empty (0 bytes); upload it again")
    return _presigned(client, bucket, key)


def _presigned(client: Any, bucket: str, key: str) -> str:
    url: str = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRY_S
    )
    return url


def check_local_source(path: Path, shown: str) -> None:
    """Refuse a local source that cannot be a video before ffprobe is asked."""
    if not path.exists():
        raise InvalidSource(
            f"source not found: {shown}; check the path (a relative path is resolved from the "
            "directory hlsvault was started in)"
        )
    if path.is_dir():
        raise InvalidSource(f"source {shown} is a directory; pass the path of a video file")
    if not path.is_file():
        raise InvalidSource(f"source {shown} is not a regular file; pass the path of a video file")
    if path.stat().st_size == 0:
        raise InvalidSource(
            f"source {shown} is empty (0 bytes); the copy or upload probably failed, copy it again"
        )


def ffmpeg_target(source: str, *, probed: bool = False) -> tuple[str, str]:
    """What ffmpeg should open for ``source``, and how to name it in messages (a presigned
    URL's query string is a credential and is never shown). ``probed``: the job's probe found
    the source already, so an ``s3://`` one is not checked again (one round trip fewer; if it
    vanished since, ffmpeg's own error says so)."""
    if is_s3_url(source):
        return s3_source_url(source, check=not probed), source
    if _is_url(source):
        return source, shown_name(source)
    check_not_a_url(source)
    check_local_source(Path(source), source)
    return source, source


def check_not_a_url(source: str) -> None:
    """Refuse a source that is a URL of a scheme hlsvault does not read (``S3://``,
    ``ftp://``), which would otherwise be looked for as a local path and reported missing."""
    refusal = scheme_refusal(source)
    if refusal is not None:
        raise InvalidSource(refusal)


def scheme_refusal(source: str, *, what: str = "source") -> str | None:
    """Why ``source`` is refused, when it starts with a URL scheme other than those of
    :data:`SOURCE_SCHEMES`; None when it has one of those or is a local path. The message
    names ``what`` and shows the scheme alone: the rest may hold a credential."""
    scheme = url_scheme(source)
    if scheme is None or scheme in SOURCE_SCHEMES:
        return None
    shown = f"{what} {shown_url(source)}"
    lower = scheme.lower()
    if lower == "s3":
        return f"{shown} is not an S3 URL: S3 URLs are lower case, s3://bucket/key"
    if lower in SOURCE_SCHEMES:
        return f"{shown}: write the scheme in lower case: {lower}://…"
    if lower == "file":
        return f"{shown}: give the path itself, not a file:// URL"
    return (f"{shown} is neither a local path, an http(s) URL nor s3://bucket/key (schemes in "
            "lower case)")


def shown_name(target: str) -> str:
    """How to name ``target`` in a message: a URL loses its user name and password and its
    query string (for a presigned URL, a credential)."""
    if not _is_url(target):
        return target
    scheme, _, rest = target.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def ffmpeg_command(outputs: list[Any]) -> list[str]:
    """The argument list of one ffmpeg writing every one of ``outputs`` (ffmpeg-python nodes):
    quiet, no stdin, progress as key=value lines on stdout (what run_ffmpeg reads)."""
    import ffmpeg

    args: list[str] = (
        ffmpeg.merge_outputs(*outputs)
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-nostats",
                     "-progress", "pipe:1")
        .overwrite_output()
        .compile()
    )
    return args


def ffmpeg_input(target: str, *, demuxer: str | None = None) -> tuple[str, dict[str, str]]:
    """The name and input options under which ffmpeg or ffprobe may open ``target`` (what
    :func:`ffmpeg_target` returned): the protocol and demuxer allow-lists, and ``-f demuxer``
    when the demuxer is known (the segment stage, from the probe).

    A local path is given as ``file:<path>``, so that ffmpeg reads the file of that name even
    when the name looks like a protocol or a pattern (``concat:a|b``, ``frame%03d.png``)."""
    if _is_url(target):
        name, protocols = target, URL_PROTOCOLS
    else:
        name, protocols = f"file:{target}", LOCAL_PROTOCOLS
    options = {"protocol_whitelist": protocols, "format_whitelist": ",".join(SOURCE_DEMUXERS)}
    if demuxer is not None:
        options["f"] = demuxer
    return name, options


def work_input(path: str, *, demuxer: str) -> tuple[str, dict[str, str]]:
    """The name and input options under which ffmpeg may open one of hlsvault's own work files
    (a chunk's audio piece): the file protocol and that one demuxer, nothing else."""
    return f"file:{path}", {
        "protocol_whitelist": LOCAL_PROTOCOLS, "format_whitelist": demuxer, "f": demuxer,
    }


def source_demuxer(format_name: str, shown: str) -> str:
    """The allow-listed demuxer for ffprobe's ``format_name`` (``mov,mp4,m4a,3gp,3g2,mj2`` →
    ``mov``), or :class:`~pipeline.errors.InvalidSource` saying what was found."""
    allowed = [name for name in format_name.split(",") if name in SOURCE_DEMUXERS]
    if not allowed:
        raise InvalidSource(format_refusal(format_name, shown))
    return allowed[0]


def format_refusal(format_name: str, shown: str) -> str:
    """Why a source read by ffmpeg as ``format_name`` is refused, and what to upload instead."""
    kind = _REFUSED_KINDS.get(format_name)
    if kind is None:
        # ffmpeg names its still-image demuxers <codec>_pipe: png_pipe, jpeg_pipe …
        kind = "an image" if format_name.endswith("_pipe") else "a file of another kind"
    *others, last = SOURCE_DEMUXERS.values()
    accepted = f"{', '.join(others)} or {last}"
    return (
        f"source {shown} is {kind} (ffmpeg reads it as '{format_name}'), not a video file "
        f"hlsvault packages; upload the video itself, as one file in {accepted}"
    )


def _is_url(target: str) -> bool:
    return url_scheme(target) in ("http", "https")
