"""Server-rendered pages of the ops app: plain f-strings, every value through ``html.escape``.

The pages work without JavaScript; ``/static/live.js`` polls the JSON API every 1.5 s and
rewrites the live parts in place. No page holds an inline script, style element or style
attribute (the Content-Security-Policy refuses them): what a script needs to know rides in
``data-`` attributes, and progress is a ``<progress>`` element.

Records reach these functions already redacted (:func:`pipeline.logs.redacted_record`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote, urlencode

from pipeline.jobs import STATUSES, JobRecord, StageState

from .metrics import THROUGHPUT_BUCKET_S, Heartbeat, QueueStats, job_progress

#: How often the pages poll the JSON API.
POLL_MS = 1500


def page(title: str, body: str, *, poll: str | None = None, render: str = "",
         scripts: Sequence[str] = ()) -> str:
    """A whole HTML page around ``body`` (already escaped markup); with ``poll``, live.js polls
    that JSON URL and rewrites the page with its ``render`` function ("jobs" or "job")."""
    live = (
        f' data-poll="{escape(poll)}" data-render="{escape(render)}" data-poll-ms="{POLL_MS}"'
        if poll is not None else ""
    )
    tags = "".join(
        f'<script src="/static/{escape(name)}"></script>'
        for name in (*scripts, *(("live.js",) if poll is not None else ()))
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)} · hlsvault ops</title>"
        '<link rel=stylesheet href="/static/ops.css"></head>'
        f"<body{live}>"
        '<header><a href="/"><b>hlsvault ops</b></a><a href="/">jobs</a>'
        '<a href="/assets">assets</a>'
        '<a href="/metrics">metrics</a></header>'
        f"<main>{body}</main>{tags}</body></html>"
    )


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _clock(stamp: float | None) -> str:
    return "–" if stamp is None else time.strftime("%H:%M:%S", time.gmtime(stamp))


def _bar(fraction: float) -> str:
    return f"<progress max=1 value={fraction:.3f}>{fraction * 100:.0f}%</progress>"


def job_summary(record: JobRecord, now: float) -> dict[str, object]:
    """One row of the jobs list, as the JSON API gives it and the page renders it."""
    end = record.finished_at or now
    return {
        "job_id": record.job_id,
        "status": record.status,
        "asset": record.asset,
        "source": record.source,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "age_s": round(now - record.created_at, 1),
        "duration_s": round(end - record.created_at, 1),
        "progress": round(job_progress(record), 4),
    }


def jobs_page(
    records: Sequence[JobRecord],
    *,
    status: str | None,
    counts: dict[str, int],
    queues: Sequence[QueueStats] | None,
    workers: Sequence[Heartbeat] | None,
    chart: Sequence[tuple[float, int, int]],
    now: float,
) -> str:
    """The jobs list (the newest of ``status``, or of all), with every status's count."""
    filters = " ".join(
        f'<a href="/?{urlencode({"status": s})}">{"<b>" if s == status else ""}{escape(s)} '
        f'(<span id=count-{s}>{counts.get(s, 0)}</span>){"</b>" if s == status else ""}</a>'
        for s in STATUSES
    )
    rows = "".join(_job_row(r, now) for r in records)
    api = "/api/jobs" + (f"?{urlencode({'status': status})}" if status else "")
    body = (
        f"<section><h2>Jobs{' — ' + escape(status) if status else ''}</h2>"
        f'<p class=filters>filter: <a href="/">all</a> {filters}</p>'
        "<table><thead><tr><th>job</th><th>status</th><th>asset</th><th>source</th>"
        "<th>age</th><th>duration</th><th>progress</th></tr></thead>"
        f"<tbody id=jobs>{rows}</tbody></table></section>"
        f"<section><h2>Throughput, last hour</h2>{throughput_svg(chart)}</section>"
        f"<section><h2>Queues</h2>{queues_table(queues)}</section>"
        f"<section><h2>Workers</h2>{workers_table(workers)}</section>"
    )
    return page("jobs", body, poll=api, render="jobs")


def _job_row(record: JobRecord, now: float) -> str:
    status = escape(record.status)
    end = record.finished_at or now
    return (
        f'<tr><td><a href="/jobs/{quote(record.job_id)}">{escape(record.job_id[:12])}</a></td>'
        f"<td class=status-{status}>{status}</td><td>{escape(record.asset)}</td>"
        f"<td>{escape(record.source)}</td><td>{_seconds(now - record.created_at)}</td>"
        f"<td>{_seconds(end - record.created_at)}</td><td>{_bar(job_progress(record))}</td></tr>"
    )


def queues_table(queues: Sequence[QueueStats] | None) -> str:
    if queues is None:
        return "<p>No Redis configured (embedded mode): there are no queues to show.</p>"
    rows = "".join(
        f"<tr><td>{escape(q.name)}</td><td>{q.queued}</td><td>{q.in_flight}</td>"
        f"<td>{q.delayed}</td><td>{q.dead}</td><td>{_seconds(q.oldest_age_s)}</td></tr>"
        for q in queues
    )
    return (
        "<table id=queues><thead><tr><th>queue</th><th>waiting</th><th>in flight</th>"
        "<th>delayed</th><th>dead letters</th><th>oldest waiting</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def workers_table(workers: Sequence[Heartbeat] | None) -> str:
    if workers is None:
        return "<p>No Redis configured (embedded mode).</p>"
    rows = "".join(
        f"<tr><td>{escape(w.broker_id)}</td><td>{w.age_s:.1f} s ago</td></tr>" for w in workers
    )
    return (
        f"<p id=workers-alive>{len(workers)} alive</p>"
        "<table><thead><tr><th>broker id</th><th>last heartbeat</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def throughput_svg(chart: Sequence[tuple[float, int, int]]) -> str:
    """Jobs finished per bucket as stacked bars: succeeded (green) under failed (red)."""
    width, height, gap = 40, 100, 6
    peak = max([ok + bad for _, ok, bad in chart] + [1])
    bars = []
    for i, (start, ok, bad) in enumerate(chart):
        x = i * (width + gap)
        ok_h = height * ok / peak
        bad_h = height * bad / peak
        label = time.strftime("%H:%M", time.gmtime(start))
        bars.append(
            f'<g><title>{label}+{THROUGHPUT_BUCKET_S // 60} min: {ok} succeeded, {bad} failed'
            f'</title><rect x="{x}" y="{height - ok_h:.1f}" width="{width}" height="{ok_h:.1f}" '
            f'fill="#1b7f2a"/><rect x="{x}" y="{height - ok_h - bad_h:.1f}" width="{width}" '
            f'height="{bad_h:.1f}" fill="#b00020"/>'
            f'<text x="{x}" y="{height + 14}" font-size="10">{label}</text>'
            f'<text x="{x}" y="{max(10.0, height - ok_h - bad_h - 2):.1f}" font-size="10">'
            f"{ok + bad or ''}</text></g>"
        )
    total_width = len(chart) * (width + gap)
    return (
        f'<svg id=throughput width="{total_width}" height="{height + 20}" '
        f'role="img" aria-label="jobs finished per {THROUGHPUT_BUCKET_S // 60} minutes">'
        f"{''.join(bars)}</svg>"
    )


def _stage_row(stage: StageState) -> str:
    status = escape(stage.status)
    return (
        f'<tr id="stage-{escape(stage.name)}"><td>{escape(stage.name)}</td>'
        f"<td class=status-{status}>{status}</td><td>{_clock(stage.started_at)}</td>"
        f"<td>{_clock(stage.finished_at)}</td><td>{stage.attempts}</td>"
        f"<td>{_bar(stage.progress)}<span class=pct> {stage.progress * 100:.0f}%</span></td>"
        f"<td class=err>{escape(stage.error or '')}</td></tr>"
    )


def job_page(
    record: JobRecord,
    *,
    csrf: dict[str, str],
    preview: Preview,
    now: float,
) -> str:
    job_id = record.job_id
    status = escape(record.status)
    actions = []
    # A spec this ops app cannot read is not retried here (dashboard.actions): no button for
    # a refusal; the spec row says why.
    if record.status in ("failed", "cancelled") and record.spec_problem is None:
        actions.append(
            f'<form method=post action="/jobs/{quote(job_id)}/retry">'
            f'<input type=hidden name=csrf value="{escape(csrf["retry"])}">'
            "<button id=retry>Retry as a new job</button></form>"
        )
    if not record.done:
        actions.append(
            f'<form method=post action="/jobs/{quote(job_id)}/cancel">'
            f'<input type=hidden name=csrf value="{escape(csrf["cancel"])}">'
            "<button id=cancel>Cancel</button></form>"
        )
    links = []
    if "retry_of" in record.fields:
        old = record.fields["retry_of"]
        links.append(f'retry of <a href="/jobs/{quote(old)}">{escape(old[:12])}</a>')
    if "retried_as" in record.fields:
        new = record.fields["retried_as"]
        links.append(
            f'retried as <a id=retried-as href="/jobs/{quote(new)}">{escape(new[:12])}</a>'
        )
    player = _preview_section(record.asset, preview) if record.status == "succeeded" else ""
    end = record.finished_at or now
    # A spec this ops app cannot read (a newer submitter's option): the job is shown all the
    # same, with why in place of what it cannot read.
    spec = record.runnable_spec
    unread = record.spec_problem
    ladder = "–" if spec is None else spec.ladder
    problem = ("" if unread is None else
               f"<tr><th>spec</th><td id=spec-error class=err>{escape(unread)}</td></tr>")
    body = (
        f"<section><h2>Job {escape(job_id)}</h2><table>"
        f"<tr><th>status</th><td id=job-status class=status-{status}>{status}</td></tr>"
        f"<tr><th>progress</th><td id=job-progress>{job_progress(record) * 100:.1f}%</td></tr>"
        f"<tr><th>asset</th><td>{escape(record.asset)}</td></tr>"
        f"<tr><th>version</th><td>{escape(record.version)}</td></tr>"
        f"<tr><th>source</th><td>{escape(record.source)}</td></tr>"
        f"<tr><th>ladder</th><td>{escape(ladder)}</td></tr>{problem}"
        f"<tr><th>created</th><td>{_clock(record.created_at)} UTC "
        f"({now - record.created_at:.0f} s ago)"
        f"</td></tr><tr><th>duration</th><td>{_seconds(end - record.created_at)}</td></tr>"
        f"<tr><th>error</th><td id=job-error class=err>{escape(record.error or '')}</td></tr>"
        f"</table><p>{' · '.join(links)}</p><p>{' '.join(actions)}</p></section>"
        "<section><h2>Stages</h2><table><thead><tr><th>stage</th><th>status</th>"
        "<th>started</th><th>finished</th><th>attempts</th><th>progress</th><th>error</th>"
        f"</tr></thead><tbody id=stages>{''.join(_stage_row(s) for s in record.stages)}</tbody>"
        f"</table></section>{player}"
    )
    scripts = ("hls.min.js", "preview.js") if preview.url is not None else ()
    return page(f"job {job_id[:12]}", body, poll=f"/api/jobs/{quote(job_id)}", render="job",
                scripts=scripts)


@dataclass(frozen=True)
class Preview:
    """The preview of a succeeded job's asset: its playback URL, or why there is none."""

    url: str | None = None
    unavailable: str | None = None


def _preview_section(asset: str, preview: Preview) -> str:
    heading = f"<h2>Preview of {escape(asset)} (its current version)</h2>"
    if preview.url is None:
        return (f"<section>{heading}<p id=preview-unavailable class=note>No preview: "
                f"{escape(preview.unavailable or 'not available')}</p></section>")
    return (
        f"<section>{heading}<video id=preview controls muted autoplay playsinline width=640 "
        f'data-src="{escape(preview.url)}"></video>'
        "<p class=note><small>Played through the key server with a token that lives 10 minutes."
        "</small></p></section>"
    )

