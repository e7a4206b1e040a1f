"""The `hlsvault` command line: translate arguments, delegate, report.

hlsvault package SOURCE [--asset ID] [--ladder copy|default] [--segment-seconds S]
                        [--key-rotation-segments N] [--download [RENDITION]]
                        [--container ts|fmp4] [--codec h264|hevc] [--audio-only]
                        [--subtitles LANG=FILE ...] [--trick-play] [--json]
hlsvault submit SOURCE [same options as package]          (distributed mode)
hlsvault status JOB [--wait] [--json]
hlsvault serve [--host H] [--port P] [--certfile F --keyfile F] [--workers N]
               [--server uvicorn|granian]
hlsvault url ASSET [--ttl SECONDS] [--auth token|cookie] [--sid S] [--ip A] [--download]
                   [--offline] [--thumbnails]
hlsvault token ASSET [--ttl SECONDS] [--sid S] [--ip A] [--offline]
hlsvault rekey ASSET [--grace SECONDS] [--json]
hlsvault revoke ASSET [--json]
hlsvault ingest parked [--replay ID | --drop ID] [--json]   (distributed mode)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import layout
from pipeline.errors import BadSpec, HlsvaultError, exit_code
from pipeline.jobs import MAX_SHOWN_CHARS, JobSpec, new_job_spec
from pipeline.plan import LADDERS, chunks_progress
from pipeline.settings import load_settings
from pipeline.storage import is_s3_url, url_scheme

from . import import_structlog
from .ingestcommands import add_commands as add_ingest_commands
from .jobrun import DEFAULT_WAIT_TIMEOUT_S, Context, fail, report, run_job, wait
from .keycommands import add_commands

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Commands that may set up a new embedded data directory (and its secrets); the others read
#: what an earlier `package` made, and refuse a directory that was never set up.
CREATING_COMMANDS = ("package", "serve")


def _source_argument(source: str) -> str:
    """The source as a job takes it: a URL of a scheme hlsvault reads, unchanged, or a local
    path (anything not starting with a scheme), made absolute. A URL of another scheme is
    refused here, before a job exists."""
    if url_scheme(source) is not None:
        from pipeline.sources import scheme_refusal

        refusal = scheme_refusal(source)
        if refusal is not None:
            raise BadSpec(refusal)
    return _absolute(source)


def _absolute(source: str) -> str:
    """A local path made absolute (the worker may run elsewhere); a URL unchanged."""
    if url_scheme(source) is not None:
        return source
    return str(Path(source).expanduser().absolute())


def _new_spec(args: argparse.Namespace, ctx: Context) -> JobSpec:
    settings = ctx.settings
    spec = new_job_spec(
        _source_argument(args.source),
        asset=args.asset,
        ladder=args.ladder,
        segment_seconds=args.segment_seconds,
        key_rotation_segments=args.key_rotation_segments,
        download=args.download,
        container=args.container,
        codec=args.codec,
        audio_only=args.audio_only,
        subtitles=[_sidecar_argument(value) for value in args.subtitles],
        trick_play=args.trick_play,
    )
    if settings.embedded or not is_s3_url(settings.work):
        return spec
    # The worker that probes a local file may run on another machine: the file travels
    # through work storage, like every other byte between stages (sidecars too).
    from pipeline.sources import check_local_source
    from pipeline.subtitles import check_sidecar_names, read_sidecar

    work = ctx.services.work
    # Errors name a sidecar as the user did, not by the key it is stored under.
    names = check_sidecar_names([Path(source).name for _, source in spec.subtitles],
                                spec.subtitles)
    sidecars = []
    for position, (language, source) in enumerate(spec.subtitles):
        if not is_s3_url(source):
            key = layout.uploaded_sidecar_key(spec.job_id, position, Path(source).suffix[:8])
            work.put_bytes(key, read_sidecar(source, f"subtitle file {source}"))
            source = f"{work.url.rstrip('/')}/{key}"
        sidecars.append((language, source))
    spec = replace(spec, subtitles=tuple(sidecars), subtitle_names=names)
    if url_scheme(spec.source) is not None:
        return spec
    path = Path(spec.source)
    check_local_source(path, args.source)
    key = layout.uploaded_source_key(spec.job_id, path.name)
    work.put_file(key, path)
    return replace(spec, source=f"{work.url.rstrip('/')}/{key}")


def _sidecar_argument(value: str) -> tuple[str, str]:
    """``--subtitles LANG=FILE`` as ``(language, source)``; the file as a source is given
    (an absolute path, or a URL as written). The job spec checks both."""
    language, separator, source = value.partition("=")
    if not separator or not source:
        raise BadSpec(f"--subtitles {value[:60]!r}: give LANGUAGE=FILE, e.g. "
                      "--subtitles en=talk.en.vtt")
    return language, _absolute(source)


def _prefetch_probe(source: str) -> None:
    """Start the probe's ffprobe of a local source now: it runs while this process imports and
    starts its worker, and the probe stage collects its answer (see
    :func:`pipeline.media.prefetch_probe`). Anything wrong with the source is left for the
    probe stage to report."""
    if url_scheme(source) is not None:
        return  # a URL or s3:// source: opening it is the probe stage's business
    from pipeline.media import prefetch_probe
    from pipeline.sources import ffmpeg_target

    try:
        target, _ = ffmpeg_target(_source_argument(source))
        prefetch_probe(target)
    except (HlsvaultError, OSError):
        pass


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not getattr(args, "json", False)


def _start_ahead(args: argparse.Namespace, ctx: Context) -> None:
    """An embedded `package`'s first moves, made before this process imports the rest of
    itself and starts its worker: the job spec made with its remux started
    (:mod:`pipeline.headstart`) when the source allows one, then ffprobe of a local source
    started (the remux is the longer of the two, and the probe stage waits for ffprobe only
    after this process's imports). A spec that cannot be made is left for
    :func:`cmd_package` to refuse."""
    try:
        _start_remux(args, ctx)
    finally:
        _prefetch_probe(args.source)


def _start_remux(args: argparse.Namespace, ctx: Context) -> None:
    try:
        ctx.spec = _new_spec(args, ctx)
    except HlsvaultError:
        return
    from pipeline.storage import open_store

    if is_s3_url(ctx.settings.work):  # no head start there: not worth loading boto3 for
        return
    from pipeline import headstart

    # A work store that cannot be written: the stages say so, as without a head start.
    with contextlib.suppress(OSError):
        headstart.start(ctx.spec, open_store(ctx.settings.work))


def cmd_package(args: argparse.Namespace, ctx: Context) -> int:
    spec = ctx.spec if ctx.spec is not None else _new_spec(args, ctx)
    if not ctx.settings.embedded:
        record = run_job(ctx, spec, show=_show_progress(args), timeout=args.timeout)
        return report(ctx, record, as_json=args.json)
    from pipeline import headstart

    try:
        from pipeline.lifecycle import shred_due

        # No worker outlives this process: delete what earlier runs retired and is now due.
        shred_due(ctx.services, spec.asset)
        record = run_job(ctx, spec, show=_show_progress(args), timeout=args.timeout)
    finally:
        headstart.discard()  # one the job never took: stopped, its files removed
    return report(ctx, record, as_json=args.json)


def cmd_submit(args: argparse.Namespace, ctx: Context) -> int:
    spec = _new_spec(args, ctx)
    ctx.runtime.enqueue(spec)
    if args.json:
        print(json.dumps({"job_id": spec.job_id, "asset": spec.asset, "version": spec.version}))
    else:
        print(spec.job_id)
    return 0


def cmd_serve(args: argparse.Namespace, ctx: Context) -> int:
    from keyserver.serving import ServeOptions, serve

    port = args.port if args.port is not None else urlsplit(ctx.settings.public_url).port or 8000
    serve(ServeOptions(
        host=args.host, port=port, workers=args.workers, server=args.server,
        certfile=args.certfile, keyfile=args.keyfile,
    ), settings=ctx.settings)
    return 0


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    if args.wait:
        record = wait(ctx, args.job, show=_show_progress(args), timeout=args.timeout)
    else:
        record = ctx.services.jobs.get(args.job)
    from pipeline.logs import redacted_record

    planned = len(record.json_field("chunks") or [])
    # What anyone may read over the operator's shoulder: no presigned source, no token.
    record = redacted_record(record)
    if args.json:
        print(json.dumps(record.to_dict(), indent=2))
    else:
        print(f"job {record.job_id}  asset {record.asset}  {record.status}")
        if record.spec_problem is not None:
            print(f"  spec: {record.spec_problem[:MAX_SHOWN_CHARS]}")
        if planned > 1:
            done, fraction = chunks_progress(
                planned, ((s.name, s.status, s.progress) for s in record.stages)
            )
            print(f"  chunks: {done} of {planned} segmented, {fraction * 100:.1f}% transcoded")
        for stage in record.stages:
            line = f"  {stage.name:<22} {stage.status:<9} {stage.progress * 100:5.1f}%"
            if stage.attempts > 1:
                line += f"  attempts {stage.attempts}"
            if stage.error:
                line += f"  {stage.error}"
            print(line)
        if record.error:
            print(f"  error: {record.error}")
    # As `package` reports them: a job that did not succeed is exit 1.
    return 1 if record.status in ("failed", "cancelled") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hlsvault", description="Package video into private, AES-128 encrypted HLS."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    package = commands.add_parser("package", help="package a video and publish it")
    submit = commands.add_parser("submit", help="enqueue a packaging job on the fleet")
    for command in (package, submit):
        command.add_argument("source", help="a video file, an http(s) URL, or s3://bucket/key")
        command.add_argument("--asset", help="asset id (default: derived from the file name)")
        command.add_argument(
            "--ladder",
            choices=LADDERS,
            default=layout.DEFAULT_LADDER,
            help="default: transcode a 1080p-360p ladder; copy: remux as it is",
        )
        command.add_argument(
            "--segment-seconds", type=float, default=layout.DEFAULT_SEGMENT_SECONDS
        )
        command.add_argument(
            "--key-rotation-segments",
            type=int,
            default=layout.DEFAULT_KEY_ROTATION_SEGMENTS,
            help="use a new key every N segments (0: one key)",
        )
        command.add_argument(
            "--download", nargs="?", const=layout.DOWNLOAD_TOP, default=None,
            metavar="RENDITION",
            help="also write a private MP4 download of RENDITION (default: the top one); put "
                 "it after SOURCE, or write --download=720p",
        )
        command.add_argument(
            "--container", choices=layout.CONTAINERS, default=layout.DEFAULT_CONTAINER,
            help="ts: MPEG-TS segments; fmp4: CMAF (init segment + .m4s, HLS version 7), "
                 "audio as renditions of its own",
        )
        command.add_argument(
            "--codec", choices=layout.VIDEO_CODECS, default=layout.DEFAULT_VIDEO_CODEC,
            help="the default ladder's video codec (hevc: with --container fmp4)",
        )
        command.add_argument(
            "--audio-only", action="store_true",
            help="also offer an audio-only variant (for slow links and audio apps)",
        )
        command.add_argument(
            "--subtitles", action="append", default=[], metavar="LANG=FILE",
            help="add a WebVTT or SubRip subtitle file in language LANG (an RFC 5646 tag: en, "
                 "de, pt-BR); repeat for more. The source's own text tracks come along anyway",
        )
        command.add_argument(
            "--trick-play", action="store_true", default=layout.DEFAULT_TRICK_PLAY,
            help="also make an I-frame playlist (scrubbing in AVPlayer, ExoPlayer) and "
                 "thumbnail sprites with a WebVTT track (web players)",
        )
        command.add_argument("--json", action="store_true", help="print JSON on stdout")
    package.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        help="distributed mode: give up waiting after this many seconds",
    )
    package.set_defaults(handler=cmd_package)
    submit.set_defaults(
        handler=cmd_submit,
        fleet_only="submit needs a fleet to run the job (or use `hlsvault package`, which runs "
                   "it in this process)",
    )

    serve = commands.add_parser("serve", help="run the key server (and /cdn/ in embedded mode)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--certfile", help="TLS certificate (PEM)")
    serve.add_argument("--keyfile", help="TLS private key (PEM)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes, one per core to use (default 1)")
    serve.add_argument("--server", default=layout.DEFAULT_SERVER, choices=layout.SERVERS,
                       help=f"the HTTP server (default {layout.DEFAULT_SERVER})")
    serve.set_defaults(handler=cmd_serve)

    add_commands(commands, wait_timeout=DEFAULT_WAIT_TIMEOUT_S)
    add_ingest_commands(commands)

    status = commands.add_parser("status", help="show a job's stages")
    status.add_argument("job")
    status.add_argument("--json", action="store_true")
    status.add_argument("--wait", action="store_true", help="wait until the job ends")
    status.add_argument("--timeout", type=float, default=DEFAULT_WAIT_TIMEOUT_S)
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. ``argv`` None means the process's own command line: the `hlsvault`
    program, which exits when this returns."""
    code = _run(argv)
    if argv is None:
        # The process ends next. Frozen, the heap is skipped by the interpreter's final
        # garbage collections, which otherwise walk every object of every module loaded
        # (dramatiq, structlog, rich): ~35 ms of a packaging run's exit, now ~5 ms.
        gc.freeze()
    return code


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and bool(args.certfile) != bool(args.keyfile):
        return fail("--certfile and --keyfile go together", EXIT_USAGE)
    try:
        settings = load_settings(
            create=args.command in CREATING_COMMANDS,
            # Set by the parsers of commands that only make sense on a fleet.
            require_fleet=getattr(args, "fleet_only", None),
        )
    except HlsvaultError as error:
        return fail(str(error), exit_code(error))
    ctx = Context(settings)
    if args.command == "package" and settings.embedded:
        _start_ahead(args, ctx)
    import_structlog()
    import logging  # after the head start: structlog imports it anyway

    from pipeline.logs import configure_logging

    quiet = args.command != "serve" and not args.verbose
    configure_logging(level=logging.ERROR if quiet else logging.INFO)
    try:
        code: int = args.handler(args, ctx)
    except HlsvaultError as error:
        return fail(str(error), exit_code(error))
    except TimeoutError as error:
        return fail(str(error))
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    return code


if __name__ == "__main__":
    sys.exit(main())
