"""Commands about access rather than packaging: tokens, playback URLs, re-keying, revoking."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from pipeline.errors import BadSpec
from pipeline.settings import DEFAULT_TOKEN_TTL_S, Settings

AUTH_MODES = ("token", "cookie")


def _token(args: argparse.Namespace, settings: Settings) -> str:
    from pipeline.keys import check_asset_id
    from pipeline.tokens import mint_token, minting_key

    check_asset_id(args.asset)
    if args.ttl <= 0 or args.ttl > settings.token_max_ttl_s:
        raise BadSpec(
            f"--ttl must be between 1 and {settings.token_max_ttl_s} seconds "
            "(the key server refuses longer-lived tokens; see HLSVAULT_TOKEN_MAX_TTL)"
        )
    return mint_token(
        minting_key(settings), args.asset, args.ttl, algorithm=settings.token_algorithm,
        sid=getattr(args, "sid", None), ip=getattr(args, "ip", None),
    )


def _require_published(settings: Settings, asset: str) -> None:
    from pipeline.services import build_services

    if build_services(settings).catalog.current_version(asset) is None:
        raise BadSpec(f"asset {asset} is not published (or was revoked); package it first")


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    print(_token(args, settings))
    return 0


def cmd_url(args: argparse.Namespace, settings: Settings) -> int:
    _require_published(settings, args.asset)
    url = f"{settings.public_url}/v1/assets/{args.asset}/master.m3u8?token={_token(args, settings)}"
    if args.sid:
        # The key server passes it on to every variant and key URI it writes.
        url += f"&sid={quote(args.sid, safe='')}"
    if args.auth == "cookie":
        url += "&auth=cookie"
    print(url)
    return 0


def cmd_rekey(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.lifecycle import new_rekey_spec, shred_due
    from pipeline.services import build_services

    svc = build_services(settings)
    shred_due(svc, args.asset)  # what earlier re-keys left due, in case no worker did it
    from .cli import _fail, _summary, run_job

    spec = new_rekey_spec(svc, args.asset, grace_s=args.grace)
    record = run_job(spec, settings, show=sys.stderr.isatty() and not args.json,
                     timeout=args.timeout)
    if args.json:
        print(json.dumps(_summary(record, settings), indent=2))
    if record.status != "succeeded":
        return _fail(f"job {spec.job_id} failed at {record.failed_stage}: {record.error}")
    if settings.embedded:
        shred_due(svc, args.asset)  # no worker outlives this process to do it later
    if not args.json:
        print(f"re-keyed {spec.asset}: version {spec.previous_version} -> {spec.version}; "
              f"the old keys are refused after {spec.grace_s:g} s")
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.lifecycle import revoke
    from pipeline.services import build_services

    result = revoke(build_services(settings), args.asset)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"revoked {args.asset}: {result['keys_deleted']} keys deleted; the key server "
              "answers 410 Gone for it")
    return 0


def add_commands(commands: Any, *, wait_timeout: float) -> None:
    """Add the access commands to the CLI's subparsers."""
    token = commands.add_parser("token", help="mint a viewer token for an asset")
    url = commands.add_parser("url", help="print the playback URL a player opens")
    for command in (token, url):
        command.add_argument("asset")
        command.add_argument("--ttl", type=int, default=DEFAULT_TOKEN_TTL_S,
                             help="token lifetime in seconds")
        command.add_argument("--sid", help="bind the token to a viewer session id")
        command.add_argument("--ip", help="bind the token to one client address")
    token.set_defaults(handler=cmd_token)
    url.add_argument("--auth", choices=AUTH_MODES, default="token",
                     help="token: the token rides in every URL; cookie: in an HttpOnly cookie")
    url.set_defaults(handler=cmd_url)

    rekey = commands.add_parser("rekey", help="re-encrypt an asset under new keys")
    rekey.add_argument("asset")
    rekey.add_argument("--grace", type=float, default=3600.0,
                       help="seconds the old keys keep being served (default 3600)")
    rekey.add_argument("--json", action="store_true")
    rekey.add_argument("--timeout", type=float, default=wait_timeout)
    rekey.set_defaults(handler=cmd_rekey)

    revoke = commands.add_parser("revoke", help="delete an asset's keys (crypto-shredding)")
    revoke.add_argument("asset")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=cmd_revoke)
