"""``hlsvault ingest parked``: the ingest messages that could not become jobs.

    hlsvault ingest parked [--json]            list them, oldest first, with why each was parked
    hlsvault ingest parked --replay ID [--json]  run one through ingest again (once its cause
                                                is fixed: a bucket allowed, an object uploaded);
                                                dropped from the park when it became jobs
    hlsvault ingest parked --drop ID [--json]  forget one

A replay takes exactly the path a message from the queue takes (``Ingest.accept_body``), so
it makes no second job for an object that already has one. A replay that is refused again
leaves the entry parked and prints why. Exit status (:func:`pipeline.errors.exit_code`): 0 done;
1 no such entry, or the source is still refused (a bucket not allowed, an object missing);
2 the body itself is malformed (drop it); 75 Redis or S3 did not answer (try again); 78 the
settings do not name a fleet (no REDIS_URL).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from pipeline.errors import BadSpec, ConfigurationError
from pipeline.settings import Settings

if TYPE_CHECKING:  # imported when a command runs: the CLI starts without Redis's client
    from pipeline.parked import ParkingLot

    from .jobrun import Context

#: How much of a body the listing shows; --json gives all of it.
BODY_PREVIEW_CHARS = 80


#: Why these commands need a fleet (the CLI refuses them without REDIS_URL, saying this).
FLEET_ONLY = "parked ingest messages live in the fleet's Redis"


def _parking(settings: Settings) -> ParkingLot:
    from pipeline.parked import ParkingLot
    from pipeline.redisconn import connect

    if settings.redis_url is None:
        raise ConfigurationError(f"{FLEET_ONLY}: set REDIS_URL")
    return ParkingLot(connect(settings.redis_url))


def cmd_parked(args: argparse.Namespace, ctx: Context) -> int:
    # Errors of the tree leave through the CLI's edge: one line, the status of their class.
    settings = ctx.settings
    parking = _parking(settings)
    if args.replay is not None:
        return _replay(parking, args.replay, settings, as_json=args.json)
    if args.drop is not None:
        return _drop(parking, args.drop, as_json=args.json)
    return _list(parking, as_json=args.json)


def _list(parking: ParkingLot, *, as_json: bool) -> int:
    entries = parking.entries()
    stats = parking.stats()
    if as_json:
        print(json.dumps({"parked": [e.to_dict() for e in entries], "count": stats.count,
                          "overflow": stats.overflow, "cap": stats.cap}, indent=2))
        return 0
    print(f"{stats.count} parked (room for {stats.cap}); {stats.overflow} dropped for lack of "
          "room so far")
    for entry in entries:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.parked_at))
        body = entry.body[:BODY_PREVIEW_CHARS].replace("\n", " ")
        more = "…" if len(entry.body) > BODY_PREVIEW_CHARS or entry.truncated else ""
        print(f"{entry.id:>6}  {stamp} UTC  {entry.reason}\n        body: {body}{more}")
    return 0


def _replay(parking: ParkingLot, entry_id: str, settings: Settings, *, as_json: bool) -> int:
    from pipeline.redisconn import connect
    from workers.ingest import open_ingest

    entry = parking.get(entry_id)
    if entry.truncated:
        raise BadSpec(f"parked message {entry_id} was too large to keep whole, so it cannot be "
                      f"replayed; drop it with --drop {entry_id}")
    assert settings.redis_url is not None  # noqa: S101 - _parking checked it
    accepted = open_ingest(settings, connect(settings.redis_url)).accept_body(entry.body)
    parking.remove(entry_id)
    if as_json:
        print(json.dumps({"id": entry_id, "jobs": [a.to_dict() for a in accepted]}, indent=2))
        return 0
    if not accepted:
        print(f"replayed {entry_id}: it names no created object, so there was nothing to "
              "package; dropped")
    for item in accepted:
        known = " (already a job)" if item.duplicate else ""
        print(f"replayed {entry_id}: job {item.job_id} for asset {item.asset}{known}")
    return 0


def _drop(parking: ParkingLot, entry_id: str, *, as_json: bool) -> int:
    parking.get(entry_id)  # NotFound, with the mend, when there is no such entry
    dropped = parking.remove(entry_id)
    if as_json:
        print(json.dumps({"id": entry_id, "dropped": dropped}))
    else:
        print(f"dropped {entry_id}" if dropped else f"{entry_id} was already gone")
    return 0


def add_commands(commands: Any) -> None:
    """Add ``hlsvault ingest …`` to the CLI's subparsers."""
    ingest = commands.add_parser("ingest", help="S3 ingest: messages that did not become jobs")
    sub = ingest.add_subparsers(dest="ingest_command", required=True)
    parked = sub.add_parser("parked", help="list, replay or drop parked ingest messages",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parked.add_mutually_exclusive_group()
    action.add_argument("--replay", metavar="ID",
                        help="run a parked message through ingest again")
    action.add_argument("--drop", metavar="ID", help="forget a parked message")
    parked.add_argument("--json", action="store_true", help="print JSON on stdout")
    parked.set_defaults(handler=cmd_parked, fleet_only=FLEET_ONLY)
