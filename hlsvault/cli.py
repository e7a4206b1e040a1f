"""The `hlsvault` command line: translate arguments, delegate, report.

hlsvault package SOURCE [--asset ID] [--ladder copy|default] [--segment-seconds S]
                        [--key-rotation-segments N] [--json]
hlsvault submit SOURCE [same options as package]          (distributed mode)
hlsvault status JOB [--wait] [--json]
hlsvault serve [--host H] [--port P] [--certfile F --keyfile F]
hlsvault url ASSET [--ttl SECONDS] [--auth token|cookie] [--sid S] [--ip A]
hlsvault token ASSET [--ttl SECONDS] [--sid S] [--ip A]
hlsvault rekey ASSET [--grace SECONDS] [--json]
hlsvault revoke ASSET [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import HlsvaultError
from pipeline.jobs import JobRecord, JobSpec, new_job_spec
from pipeline.settings import Settings, load_settings

from .keycommands import add_commands

EXIT_FAILED = 1
EXIT_USAGE = 2
#: How often a waiting CLI reads the job record back.
WAIT_POLL_S = 0.25
#: A waiting CLI gives up after this long; the job itself carries on.
DEFAULT_WAIT_TIMEOUT_S = 6 * 3600.0


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"hlsvault: {message}", file=sys.stderr)
    return code


def _source_argument(source: str) -> str:
    """Local paths become absolute (the worker may run elsewhere); URLs pass unchanged."""
    if "://" in source:
        return source
    return str(Path(source).expanduser().absolute())


def _summary(record: JobRecord, settings: Settings) -> dict[str, Any]:
    from pipeline.services import build_services

    summary: dict[str, Any] = {
        "job_id": record.spec.job_id,
        "asset": record.spec.asset,
        "version": record.spec.version,
        "status": record.status,
    }
    if record.status == "succeeded":
        described = build_services(settings).catalog.get_version(
            record.spec.asset, record.spec.version
        )
        summary["renditions"] = [
            {
                "name": r.name,
                "width": r.width,
                "height": r.height,
                "bandwidth": r.bandwidth,
                "average_bandwidth": r.average_bandwidth,
                "codecs": r.codecs,
                "segments": len(r.segments),
            }
            for r in described.renditions
        ]
        summary["keys"] = described.key_count
        summary["master_url"] = f"{settings.public_url}/v1/assets/{record.spec.asset}/master.m3u8"
    else:
        summary["renditions"] = []
        summary["error"] = record.error
        summary["failed_stage"] = record.failed_stage
    return summary


def _new_spec(args: argparse.Namespace, settings: Settings) -> JobSpec:
    spec = new_job_spec(
        _source_argument(args.source),
        asset=args.asset,
        ladder=args.ladder,
        segment_seconds=args.segment_seconds,
        key_rotation_segments=args.key_rotation_segments,
    )
    if settings.embedded or "://" in spec.source or not settings.work.startswith("s3://"):
        return spec
    # The worker that probes a local file may run on another machine: the file travels
    # through work storage, like every other byte between stages.
    from pipeline.media import check_local_source
    from pipeline.storage import open_store

    path = Path(spec.source)
    check_local_source(path, args.source)
    key = f"sources/{spec.job_id}/{path.name}"
    work = open_store(settings.work)
    work.put_file(key, path)
    return replace(spec, source=f"{work.url.rstrip('/')}/{key}")


def _wait(job_id: str, *, show: bool, timeout: float) -> JobRecord:
    from workers import runtime

    from .progress import StageProgress

    jobs = runtime.services().jobs
    deadline = time.monotonic() + timeout
    with StageProgress(enabled=show) as bars:
        while True:
            record = jobs.get(job_id)
            bars.update(record)
            if record.done:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record.status} after {timeout:.0f} s")
            time.sleep(WAIT_POLL_S)


def _report(record: JobRecord, settings: Settings, *, as_json: bool) -> int:
    summary = _summary(record, settings)
    if as_json:
        print(json.dumps(summary, indent=2))
    if record.status != "succeeded":
        return _fail(f"job {record.spec.job_id} failed at {record.failed_stage}: {record.error}")
    if not as_json:
        names = ", ".join(r["name"] for r in summary["renditions"])
        print(f"published {record.spec.asset} version {record.spec.version}: {names}")
        print(f"play it: hlsvault url {record.spec.asset}")
    return 0


def cmd_package(args: argparse.Namespace, settings: Settings) -> int:
    spec = _new_spec(args, settings)
    if settings.embedded:
        from pipeline.lifecycle import shred_due
        from pipeline.services import build_services

        # No worker outlives this process: delete what earlier runs retired and is now due.
        shred_due(build_services(settings), spec.asset)
    record = run_job(spec, settings, show=sys.stderr.isatty() and not args.json,
                     timeout=args.timeout)
    return _report(record, settings, as_json=args.json)


def run_job(spec: JobSpec, settings: Settings, *, show: bool, timeout: float) -> JobRecord:
    """Run a job to its end: in this process (embedded), or on the fleet, waiting for it."""
    if settings.embedded:
        from workers.embedded import run_embedded

        from .progress import StageProgress

        with StageProgress(enabled=show) as bars:
            record = run_embedded(spec, on_update=bars.update)
    else:
        import workers.actors  # noqa: F401 - declares the actors on the broker before sending
        from workers import flow, runtime

        flow.start(runtime.services(), spec)
        record = _wait(spec.job_id, show=show, timeout=timeout)
    return record


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded:
        return _fail(
            "submit needs a fleet to run the job: set REDIS_URL (or use `hlsvault package`, "
            "which runs the job in this process)",
            EXIT_USAGE,
        )
    spec = _new_spec(args, settings)
    import workers.actors  # noqa: F401 - declares the actors on the broker before sending
    from workers import flow, runtime

    flow.start(runtime.services(), spec)
    if args.json:
        print(json.dumps({"job_id": spec.job_id, "asset": spec.asset, "version": spec.version}))
    else:
        print(spec.job_id)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from keyserver import create_app

    kwargs: dict[str, Any] = {}
    if args.certfile:
        kwargs.update(ssl_certfile=args.certfile, ssl_keyfile=args.keyfile)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        access_log=False,
        log_config=None,
        timeout_keep_alive=5,
        **kwargs,
    )
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.jobs import UnknownJob
    from pipeline.services import build_services

    try:
        if args.wait:
            record = _wait(
                args.job, show=sys.stderr.isatty() and not args.json, timeout=args.timeout
            )
        else:
            record = build_services(settings).jobs.get(args.job)
    except UnknownJob:
        return _fail(f"no job {args.job}")
    if args.json:
        print(json.dumps(record.to_dict(), indent=2))
    else:
        print(f"job {record.spec.job_id}  asset {record.spec.asset}  {record.status}")
        for stage in record.stages:
            line = f"  {stage.name:<22} {stage.status:<9} {stage.progress * 100:5.1f}%"
            if stage.attempts > 1:
                line += f"  attempts {stage.attempts}"
            if stage.error:
                line += f"  {stage.error}"
            print(line)
        if record.error:
            print(f"  error: {record.error}")
    return 0 if record.status != "failed" else EXIT_FAILED


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
            choices=("copy", "default"),
            default="default",
            help="default: transcode a 1080p-360p ladder; copy: remux as it is",
        )
        command.add_argument("--segment-seconds", type=float, default=6.0)
        command.add_argument(
            "--key-rotation-segments",
            type=int,
            default=0,
            help="use a new key every N segments (0: one key)",
        )
        command.add_argument("--json", action="store_true", help="print JSON on stdout")
    package.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        help="distributed mode: give up waiting after this many seconds",
    )
    package.set_defaults(handler=cmd_package)
    submit.set_defaults(handler=cmd_submit)

    serve = commands.add_parser("serve", help="run the key server (and /cdn/ in embedded mode)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--certfile", help="TLS certificate (PEM)")
    serve.add_argument("--keyfile", help="TLS private key (PEM)")
    serve.set_defaults(handler=cmd_serve)

    add_commands(commands, wait_timeout=DEFAULT_WAIT_TIMEOUT_S)

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
        return _fail("--certfile and --keyfile go together", EXIT_USAGE)
    try:
        settings = load_settings()
    except HlsvaultError as error:
        return _fail(str(error), EXIT_USAGE)
    from pipeline.logs import configure_logging

    quiet = args.command != "serve" and not args.verbose
    configure_logging(level=logging.ERROR if quiet else logging.INFO)
    if args.command == "serve" and args.port is None:
        args.port = urlsplit(settings.public_url).port or 8000
    try:
        code: int = args.handler(args, settings)
    except HlsvaultError as error:
        return _fail(str(error), EXIT_USAGE)
    except TimeoutError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return code


if __name__ == "__main__":
    sys.exit(main())
