// The ops app's live parts: polls the JSON API named by <body data-poll> every data-poll-ms
// and rewrites the table named by data-render ("jobs" or "job") in place. Served from /static/
// so that the Content-Security-Policy can refuse every inline script.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}
function fmtTime(t) { return t ? new Date(t * 1000).toISOString().slice(11, 19) : "–"; }
function fmtSecs(s) { return s === null || s === undefined ? "–" : s.toFixed(1) + " s"; }
function bar(fraction) {
  const node = el("progress");
  node.max = 1; node.value = fraction;
  return node;
}
function renderJob(job) {
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = "status-" + job.status;
  document.getElementById("job-progress").textContent = (job.progress * 100).toFixed(1) + "%";
  document.getElementById("job-error").textContent = job.error || "";
  document.getElementById("stages").replaceChildren(...job.stages.map(s => {
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
  for (const [status, count] of Object.entries(data.counts)) {
    const shown = document.getElementById("count-" + status);
    if (shown) shown.textContent = String(count);
  }
  document.getElementById("jobs").replaceChildren(...data.jobs.map(j => {
    const row = el("tr"), link = el("a", j.job_id.slice(0, 12));
    link.href = "/jobs/" + encodeURIComponent(j.job_id);
    const id = el("td"); id.appendChild(link);
    const progress = el("td"); progress.appendChild(bar(j.progress));
    row.append(id, el("td", j.status, "status-" + j.status), el("td", j.asset),
      el("td", j.source), el("td", fmtSecs(j.age_s)), el("td", fmtSecs(j.duration_s)), progress);
    return row;
  }));
}
const RENDERERS = {job: renderJob, jobs: renderJobs};

async function poll(url, render, every) {
  try {
    const response = await fetch(url, {credentials: "same-origin", cache: "no-store"});
    if (response.ok) render(await response.json());
  } catch (error) { console.log("poll failed: " + error); }
  setTimeout(() => poll(url, render, every), every);
}

const config = document.body.dataset;
if (config.poll && RENDERERS[config.render]) {
  const every = Number(config.pollMs) || 1500;
  setTimeout(() => poll(config.poll, RENDERERS[config.render], every), every);
}
