"""The Assets pages: every asset, one asset with its versions, and the confirmation step of
Re-key and Revoke. Plain f-strings, every value through ``html.escape``, no inline script or
style (the Content-Security-Policy refuses them)."""

from __future__ import annotations

import time
from html import escape
from urllib.parse import quote

from .library import AssetRow, VersionRow
from .views import page

#: What each action does, as the confirmation page says it.
CONSEQUENCES = {
    "rekey": (
        "Re-key", "Re-encrypts every segment under new keys as a new version (nothing is "
        "transcoded). Players get the new version at once; the old keys keep being served for "
        "an hour, then they are refused and deleted.",
    ),
    "revoke": (
        "Revoke", "Deletes every key and every download of this asset and purges it from the "
        "CDN. Every key server answers 410 Gone for it from now on. This cannot be undone: "
        "the asset has to be packaged again from its source.",
    ),
}


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _requests(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "not counted (no Redis)"
    if not counts:
        return "none"
    return ", ".join(f"{escape(outcome)} {n}" for outcome, n in sorted(counts.items()))


def _asset_link(asset: str) -> str:
    return f'<a href="/assets/{quote(asset)}">{escape(asset)}</a>'


def assets_page(rows: list[AssetRow], *, cdn_signing: str) -> str:
    body_rows = "".join(
        f"<tr id=\"asset-{escape(row.asset)}\"><td>{_asset_link(row.asset)}</td>"
        f"<td class=status-{escape(row.status)}>{escape(row.status)}</td>"
        f"<td>{escape(row.current.version) if row.current else '–'}</td>"
        f"<td>{escape(', '.join(row.current.renditions)) if row.current else '–'}</td>"
        f"<td>{escape(cdn_signing)}</td>"
        f"<td>{_download(row.current)}</td>"
        f"<td>{len(row.retired)}</td><td>{_requests(row.requests)}</td></tr>"
        for row in rows
    )
    body = (
        "<section><h2>Assets</h2>"
        f"<p class=note>CDN signing (the key server's setting): <b id=cdn-signing>"
        f"{escape(cdn_signing)}</b></p>"
        "<table><thead><tr><th>asset</th><th>status</th><th>current version</th>"
        "<th>renditions</th><th>CDN-signed</th><th>download</th><th>retired versions</th>"
        "<th>key requests, last hour</th></tr></thead>"
        f"<tbody id=assets>{body_rows}</tbody></table></section>"
    )
    return page("assets", body)


def _download(version: VersionRow | None) -> str:
    if version is None or version.download is None:
        return "no"
    return f"yes ({escape(version.download)})"


def _version_row(version: VersionRow, *, current: bool, now: float) -> str:
    if current:
        shred = "current"
    elif version.shred_at is not None and version.shred_at <= now:
        shred = f"keys withdrawn {_when(version.shred_at)}"
    else:
        shred = f"keys served until {_when(version.shred_at)}"
    return (
        f"<tr class=version><td>{escape(version.version)}</td><td>{_when(version.created_at)}</td>"
        f"<td>{escape(', '.join(version.renditions))}</td><td>{_download(version)}</td>"
        f"<td>{escape(shred)}</td></tr>"
    )


def asset_page(row: AssetRow, *, cdn_signing: str, now: float) -> str:
    asset = row.asset
    versions = []
    if row.current is not None:
        versions.append(_version_row(row.current, current=True, now=now))
    versions += [_version_row(v, current=False, now=now) for v in row.retired]
    actions = ""
    if row.status == "published":
        actions = (
            f'<p><a class=button id=rekey href="/assets/{quote(asset)}/rekey">Re-key…</a> '
            f'<a class=button id=revoke href="/assets/{quote(asset)}/revoke">Revoke…</a></p>'
        )
    revoked = (f"<tr><th>revoked</th><td id=revoked-at>{_when(row.state.revoked_at)}</td></tr>"
               if row.state.revoked else "")
    body = (
        f"<section><h2>Asset {escape(asset)}</h2><table>"
        f"<tr><th>status</th><td id=asset-status class=status-{escape(row.status)}>"
        f"{escape(row.status)}</td></tr>{revoked}"
        f"<tr><th>CDN-signed</th><td>{escape(cdn_signing)}</td></tr>"
        f"<tr><th>key requests, last hour</th><td>{_requests(row.requests)}</td></tr>"
        f"</table>{actions}</section>"
        "<section><h2>Versions</h2><table><thead><tr><th>version</th><th>packaged</th>"
        "<th>renditions</th><th>download</th><th>keys</th></tr></thead>"
        f"<tbody id=versions>{''.join(versions)}</tbody></table></section>"
    )
    return page(f"asset {asset}", body)


def confirm_page(asset: str, action: str, *, csrf: str) -> str:
    title, consequence = CONSEQUENCES[action]
    body = (
        f"<section><h2>{escape(title)} {escape(asset)}?</h2><p>{escape(consequence)}</p>"
        f'<form method=post action="/assets/{quote(asset)}/{quote(action)}">'
        f'<input type=hidden name=csrf value="{escape(csrf)}">'
        f'<input type=hidden name=confirm value="{escape(asset)}">'
        f"<button id=confirm>Yes, {escape(title.lower())} {escape(asset)}</button> "
        f'<a href="/assets/{quote(asset)}">No, go back</a></form></section>'
    )
    return page(f"{action} {asset}", body)
