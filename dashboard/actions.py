"""The ops app's two actions, Retry and Cancel: POSTed forms, CSRF-checked, then delegated.

    POST /jobs/{job_id}/retry    303 to the new job; 403 bad token or cross-origin; 404 no such
                                 job; 409 the job has not failed or been cancelled; and when
                                 this ops app cannot read the job's spec (its page shows why
                                 and offers no Retry): 503 it names options this version does
                                 not know (upgrade the ops app), 422 it is damaged (resubmit),
                                 400 a subtitle file name it holds is refused
    POST /jobs/{job_id}/cancel   303 back to the job (also when it had already ended); 403; 404
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from pipeline import layout
from pipeline.errors import Conflict, HlsvaultError, NewerJobOption, NotFound
from pipeline.jobs import TERMINAL, JobRecord, JobSpec, JobStore, UnknownJob, newer_options

from .auth import CsrfTokens, cross_origin
from .pages import refused

log = structlog.get_logger("hlsvault.ops")

#: The action forms carry one hidden field.
MAX_FORM_BYTES = 4096
#: What to do about a job this ops app cannot retry for options it does not know.
UPGRADE_THE_OPS_APP = "upgrade this ops app (README, Upgrading a fleet), then retry the job"

Submit = Callable[[JobSpec], None]


def retry_spec(spec: JobSpec, *, now: float) -> JobSpec:
    """``spec`` again under a new job id and version (versions sort by time, as new jobs')."""
    job_id = uuid.uuid4().hex
    return dataclasses.replace(
        spec, job_id=job_id, version=layout.new_version(job_id, now=now), created_at=now
    )


class Actions:
    def __init__(self, jobs: JobStore, *, csrf: CsrfTokens, submit: Submit) -> None:
        self.jobs = jobs
        self.csrf = csrf
        self.submit = submit

    async def retry(self, request: Request) -> Response:
        return await self._action(request, "retry")

    async def cancel(self, request: Request) -> Response:
        return await self._action(request, "cancel")

    async def _action(self, request: Request, action: str) -> Response:
        job_id = request.path_params["job_id"]
        refusal = cross_origin(request)
        if refusal is not None:
            return refusal
        # The forms are urlencoded and tiny; parsed here, as request.form() would need
        # python-multipart installed even for them.
        body = await request.body()
        given = parse_qs(body[:MAX_FORM_BYTES].decode("latin-1")).get("csrf", [""])[0]
        if not self.csrf.valid(given, action, job_id):
            return PlainTextResponse("bad or missing CSRF token; reload the page and use its "
                                     "button\n", status_code=403)
        outcome: Response = await run_in_threadpool(
            self._retry if action == "retry" else self._cancel, job_id
        )
        return outcome

    def _record(self, job_id: str) -> JobRecord:
        try:
            return self.jobs.get(job_id)
        except UnknownJob:
            raise NotFound(f"no job {job_id[:64]}") from None

    def _retry(self, job_id: str) -> Response:
        """Retry = the same spec as a new job (new id, new version). A failed job's scratch is
        discarded when it fails, so re-running only its failed stage would find nothing to
        work on; and a new job keeps the failed one's record intact for the post-mortem."""
        try:
            record = self._record(job_id)
            if record.status not in ("failed", "cancelled"):
                raise Conflict(f"job {job_id} is {record.status}; only failed or cancelled "
                               "jobs are retried")
            # A spec this ops app cannot read (a newer submitter's option) is not retried
            # without what it asked for: refused, saying why.
            problem = record.read_spec
            if isinstance(problem, NewerJobOption):
                raise newer_options(problem.options, reader="the hlsvault serving this ops app",
                                    mend=UPGRADE_THE_OPS_APP)
            spec = retry_spec(record.spec, now=self.jobs.clock())
        except HlsvaultError as error:
            return refused(error)
        self.submit(spec)
        self.jobs.backend.write(spec.job_id, {"retry_of": job_id})
        self.jobs.backend.write(job_id, {"retried_as": spec.job_id})
        log.info("job retried", job_id=job_id, new_job_id=spec.job_id)
        return RedirectResponse(f"/jobs/{spec.job_id}", status_code=303)

    def _cancel(self, job_id: str) -> Response:
        try:
            record = self._record(job_id)
        except NotFound as error:
            return refused(error)
        if record.status not in TERMINAL and self.jobs.cancel(job_id):
            log.info("job cancelled", job_id=job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)
