"""Server-rendered pages of the ops app: plain f-strings, every value through ``html.escape``.

The pages work without JavaScript; a little vanilla JS (``LIVE_JS``) polls the JSON API every
1.5 s and rewrites the live parts in place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape
from urllib.parse import quote, urlencode

from pipeline.jobs import JobRecord, StageState
from pipeline.logs import redact_text

from .metrics import (
    JOB_STATUSES,
    THROUGHPUT_BUCKET_S,
    Heartbeat,
    QueueStats,
    job_progress,
)

#: How often the pages poll the JSON API.
POLL_MS = 1500

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1d2733;color:#fff;padding:.6em 1.2em}header a{color:#fff;margin-right:1em}
main{padding:1em 1.2em}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
.status-failed{color:#b00020}.status-succeeded{color:#1b7f2a}.status-running{color:#0057b8}
.status-cancelled{color:#777}.bar{background:#e4e4e4;width:10em;height:.8em;display:inline-block}
.bar span{display:block;height:100%;background:#0057b8}.err{color:#b00020;white-space:pre-wrap}
section{margin-bottom:1.5em}form{display:inline}.filters a{margin-right:.6em}
button{padding:.3em .9em}video{background:#000;max-width:100%}
"""

LIVE_JS = """
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}
function fmtTime(t) { return t ? new Date(t * 1000).toISOString().slice(11, 19) : "–"; }
function fmtSecs(s) { return s === null || s === undefined ? "–" : s.toFixed(1) + " s"; }
function bar(fraction) {
  const outer = el("span", null, "bar"), inner = el("span");
  inner.style.width = (fraction * 100).toFixed(1) + "%"; outer.appendChild(inner); return outer;
}
async function poll(url, render) {
  try {
    const response = await fetch(url, {credentials: "same-origin", cache: "no-store"});
    if (response.ok) render(await response.json());
  } catch (error) { console.log("poll failed: " + error); }
  setTimeout(() => poll(url, render), POLL_MS);
}
function renderJob(job) {
  document.getElementById("job-status").textContent = job.status;
  document.getElementById("job-status").className = "status-" + job.status;
  document.getElementById("job-progress").textContent = (job.progress * 100).toFixed(1) + "%";
  document.getElementById("job-error").textContent = job.error || "";
  const body = document.getElementById("stages");
  body.replaceChildren(...job.stages.map(s => {
    const row = el("tr"); row.id = "stage-" + s.name;
    const progress = el("td"); progress.appendChild(bar(s.progress));
    progress.appendChild(el("span", " " + (s.progress * 100).toFixed(0) + "%", "pct"));
    row.append(el("td", s.name), el("td", s.status, "status-" + s.status),
      el("td", fmtTime(s.started_at)), el("td", fmtTime(s.finished_at)),
      el("td", String(s.attempts)), progress, el("td", s.error || "", "err"));
    return row;
  }));
}
function renderJobs(data) {
  const body = document.getElementById("jobs");
  body.replaceChildren(...data.jobs.map(j => {
    const row = el("tr"), link = el("a", j.job_id.slice(0, 12));
    link.href = "/jobs/" + encodeURIComponent(j.job_id);
    const id = el("td"); id.appendChild(link);
    const progress = el("td"); progress.appendChild(bar(j.progress));
    row.append(id, el("td", j.status, "status-" + j.status), el("td", j.asset),
      el("td", j.source), el("td", fmtSecs(j.age_s)), el("td", fmtSecs(j.duration_s)), progress);
    return row;
  }));
}
"""


def page(title: str, body: str, *, script: str = "") -> str:
    """A whole HTML page around ``body`` (already escaped markup)."""
    js = f"<script>const POLL_MS = {POLL_MS};{LIVE_JS}{script}</script>" if script else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)} · hlsvault ops</title><style>{_CSS}</style></head><body>"
        '<header><a href="/"><b>hlsvault ops</b></a><a href="/">jobs</a>'
        '<a href="/metrics">metrics</a></header>'
        f"<main>{body}</main>{js}</body></html>"
    )


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _clock(stamp: float | None) -> str:
    return "–" if stamp is None else time.strftime("%H:%M:%S", time.gmtime(stamp))


def _bar(fraction: float) -> str:
    return f'<span class=bar><span style="width:{fraction * 100:.1f}%"></span></span>'


def job_summary(record: JobRecord, now: float) -> dict[str, object]:
    """One row of the jobs list, as the JSON API gives it and the page renders it."""
    end = record.finished_at or now
    return {
        "job_id": record.spec.job_id,
        "status": record.status,
        "asset": record.spec.asset,
        "source": redact_text(record.spec.source),
        "created_at": record.spec.created_at,
        "finished_at": record.finished_at,
        "age_s": round(now - record.spec.created_at, 1),
        "duration_s": round(end - record.spec.created_at, 1),
        "progress": round(job_progress(record), 4),
    }


def jobs_page(
    records: Sequence[JobRecord],
    *,
    status: str | None,
    queues: Sequence[QueueStats] | None,
    workers: Sequence[Heartbeat] | None,
    chart: Sequence[tuple[float, int, int]],
    now: float,
) -> str:
    filters = " ".join(
        f'<a href="/?{urlencode({"status": s})}">{"<b>" if s == status else ""}{escape(s)}'
        f'{"</b>" if s == status else ""}</a>'
        for s in JOB_STATUSES
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
    return page("jobs", body, script=f"poll({_js_string(api)}, renderJobs);")


def _js_string(value: str) -> str:
    # Only URL-safe characters reach here; quote() guarantees no quote or angle bracket.
    return '"' + quote(value, safe="/?=&") + '"'


def _job_row(record: JobRecord, now: float) -> str:
    spec = record.spec
    status = escape(record.status)
    end = record.finished_at or now
    return (
        f'<tr><td><a href="/jobs/{quote(spec.job_id)}">{escape(spec.job_id[:12])}</a></td>'
        f"<td class=status-{status}>{status}</td><td>{escape(spec.asset)}</td>"
        f"<td>{escape(redact_text(spec.source))}</td><td>{_seconds(now - spec.created_at)}</td>"
        f"<td>{_seconds(end - spec.created_at)}</td><td>{_bar(job_progress(record))}</td></tr>"
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
    preview_url: str | None,
    now: float,
) -> str:
    spec = record.spec
    job_id = spec.job_id
    status = escape(record.status)
    actions = []
    if record.status in ("failed", "cancelled"):
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
    preview = ""
    if preview_url is not None:
        preview = (
            f"<section><h2>Preview of {escape(spec.asset)} (its current version)</h2>"
            f'<video id=preview controls muted autoplay playsinline width=640 '
            f'data-src="{escape(preview_url)}"></video>'
            "<p><small>Played through the key server with a token that lives 10 minutes."
            "</small></p></section>"
        )
    end = record.finished_at or now
    body = (
        f"<section><h2>Job {escape(job_id)}</h2><table>"
        f"<tr><th>status</th><td id=job-status class=status-{status}>{status}</td></tr>"
        f"<tr><th>progress</th><td id=job-progress>{job_progress(record) * 100:.1f}%</td></tr>"
        f"<tr><th>asset</th><td>{escape(spec.asset)}</td></tr>"
        f"<tr><th>version</th><td>{escape(spec.version)}</td></tr>"
        f"<tr><th>source</th><td>{escape(redact_text(spec.source))}</td></tr>"
        f"<tr><th>ladder</th><td>{escape(spec.ladder)}</td></tr>"
        f"<tr><th>created</th><td>{_clock(spec.created_at)} UTC ({now - spec.created_at:.0f} s ago)"
        f"</td></tr><tr><th>duration</th><td>{_seconds(end - spec.created_at)}</td></tr>"
        f"<tr><th>error</th><td id=job-error class=err>{escape(record.error or '')}</td></tr>"
        f"</table><p>{' · '.join(links)}</p><p>{' '.join(actions)}</p></section>"
        "<section><h2>Stages</h2><table><thead><tr><th>stage</th><th>status</th>"
        "<th>started</th><th>finished</th><th>attempts</th><th>progress</th><th>error</th>"
        f"</tr></thead><tbody id=stages>{''.join(_stage_row(s) for s in record.stages)}</tbody>"
        f"</table></section>{preview}"
    )
    script = f"poll({_js_string('/api/jobs/' + job_id)}, renderJob);"
    if preview_url is not None:
        script += _PREVIEW_JS
    head = '<script src="/static/hls.min.js"></script>' if preview_url is not None else ""
    return page(f"job {job_id[:12]}", head + body, script=script)


_PREVIEW_JS = """
(function () {
  const video = document.getElementById("preview"), src = video.dataset.src;
  if (window.Hls && Hls.isSupported()) {
    const hls = new Hls(); hls.loadSource(src); hls.attachMedia(video);
    hls.on(Hls.Events.ERROR, (event, data) => {
      if (data.fatal) console.log("preview failed: " + data.type + " " + data.details);
    });
  } else { video.src = src; }
  video.play().catch(error => console.log("autoplay refused: " + error));
})();
"""
