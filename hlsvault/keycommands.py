"""Commands about access rather than packaging: tokens, playback URLs, re-keying, revoking."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from pipeline import layout
from pipeline.errors import BadSpec, NotFound
from pipeline.settings import DEFAULT_TOKEN_TTL_S

from .jobrun import Context, report, run_job

AUTH_MODES = ("token", "cookie")


def _token(args: argparse.Namespace, ctx: Context) -> str:
    from pipeline.tokens import mint_token, minting_key

    settings = ctx.settings
    layout.check_asset_id(args.asset)
    offline = bool(args.offline)
    cap, cap_setting = (
        (settings.offline_max_ttl_s, "HLSVAULT_OFFLINE_MAX_TTL") if offline
        else (settings.token_max_ttl_s, "HLSVAULT_TOKEN_MAX_TTL")
    )
    # Without --ttl: the usual lifetime, shortened to what this deployment accepts.
    ttl = args.ttl if args.ttl is not None else min(DEFAULT_TOKEN_TTL_S, cap)
    if ttl <= 0 or ttl > cap:
        raise BadSpec(
            f"--ttl must be between 1 and {cap} seconds "
            f"(the key server refuses longer-lived tokens; see {cap_setting})"
        )
    return mint_token(
        minting_key(settings), args.asset, ttl, algorithm=settings.token_algorithm,
        sid=args.sid, ip=args.ip, offline=offline,
    )


def _require_published(ctx: Context, asset: str) -> None:
    if ctx.services.catalog.current_version(layout.check_asset_id(asset)) is None:
        raise NotFound(f"asset {asset} is not published (or was revoked); package it first")


def cmd_token(args: argparse.Namespace, ctx: Context) -> int:
    print(_token(args, ctx))
    return 0


def cmd_url(args: argparse.Namespace, ctx: Context) -> int:
    _require_published(ctx, args.asset)
    query = f"?token={_token(args, ctx)}"
    base = ctx.settings.public_url
    if args.download:
        print(layout.download_url(base, args.asset, query))
        return 0
    if args.offline:
        print(layout.offline_url(base, args.asset, query))
        return 0
    if args.sid:
        # The key server passes it on to every variant and key URI it writes.
        query += f"&sid={quote(args.sid, safe='')}"
    if args.thumbnails:
        print(layout.thumbnails_url(base, args.asset, query))
        return 0
    if args.auth == "cookie":
        query += "&auth=cookie"
    print(layout.master_url(ctx.settings.public_url, args.asset, query))
    return 0


def cmd_rekey(args: argparse.Namespace, ctx: Context) -> int:
    from pipeline.lifecycle import new_rekey_spec, shred_due

    svc = ctx.services
    shred_due(svc, args.asset)  # what earlier re-keys left due, in case no worker did it
    spec = new_rekey_spec(svc, args.asset, grace_s=args.grace)
    record = run_job(ctx, spec, show=sys.stderr.isatty() and not args.json,
                     timeout=args.timeout)
    if record.status == "succeeded" and ctx.settings.embedded:
        shred_due(svc, args.asset)  # no worker outlives this process to do it later
    return report(
        ctx, record, as_json=args.json,
        done_line=f"re-keyed {spec.asset}: version {spec.previous_version} -> {spec.version}; "
                  f"the old keys are refused after {spec.grace_s:g} s",
    )


def cmd_revoke(args: argparse.Namespace, ctx: Context) -> int:
    from pipeline.lifecycle import revoke

    result = revoke(ctx.services, args.asset)
    # Key servers told of the change drop the asset at once; any that missed the message
    # re-read its state within STATE_TTL_S. Report only once both have happened.
    time.sleep(max(0.0, result["in_effect_at"] - time.time()))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"revoked {args.asset}: {result['keys_deleted']} keys and "
              f"{result['downloads_deleted']} downloads deleted; every key server now answers "
              "410 Gone for it")
    return 0


def add_commands(commands: Any, *, wait_timeout: float) -> None:
    """Add the access commands to the CLI's subparsers."""
    token = commands.add_parser("token", help="mint a viewer token for an asset")
    url = commands.add_parser("url", help="print the playback URL a player opens")
    for command in (token, url):
        command.add_argument("asset")
        command.add_argument("--ttl", type=int, default=None,
                             help=f"token lifetime in seconds (default {DEFAULT_TOKEN_TTL_S}, "
                                  "or HLSVAULT_TOKEN_MAX_TTL when that is shorter)")
        command.add_argument("--sid", help="bind the token to a viewer session id")
        command.add_argument("--ip", help="bind the token to one client address")
        command.add_argument(
            "--offline", action="store_true",
            help="an offline token (its own lifetime cap, HLSVAULT_OFFLINE_MAX_TTL); url "
                 "prints the offline bundle's URL",
        )
    token.set_defaults(handler=cmd_token)
    url.add_argument("--auth", choices=AUTH_MODES, default="token",
                     help="token: the token rides in every URL; cookie: in an HttpOnly cookie")
    url.add_argument("--download", action="store_true",
                     help="print the URL of the MP4 download (302 to a signed URL)")
    url.add_argument("--thumbnails", action="store_true",
                     help="print the URL of the thumbnail track (WebVTT; --trick-play assets)")
    url.set_defaults(handler=cmd_url)

    rekey = commands.add_parser("rekey", help="re-encrypt an asset under new keys")
    rekey.add_argument("asset")
    rekey.add_argument("--grace", type=float, default=layout.DEFAULT_GRACE_S,
                       help="seconds the old keys keep being served (default %(default)g)")
    rekey.add_argument("--json", action="store_true")
    rekey.add_argument("--timeout", type=float, default=wait_timeout)
    rekey.set_defaults(handler=cmd_rekey)

    revoke = commands.add_parser("revoke", help="delete an asset's keys (crypto-shredding)")
    revoke.add_argument("asset")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=cmd_revoke)
