"""The ops app's JSON API (what the pages poll) and its Prometheus metrics."""

from __future__ import annotations

import dataclasses

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from pipeline.errors import HlsvaultError

from . import metrics, views
from .pages import NO_STORE, listed, refused
from .reading import OpsReader


class Api:
    def __init__(self, reader: OpsReader) -> None:
        self.reader = reader

    def jobs(self, request: Request) -> Response:
        try:
            _, records = listed(self.reader, request)
        except HlsvaultError as error:
            return refused(error)
        now = self.reader.now()
        return JSONResponse(
            {"jobs": [views.job_summary(r, now) for r in records], "counts": self.reader.counts()},
            headers=NO_STORE,
        )

    def job(self, request: Request) -> Response:
        try:
            record = self.reader.record(request.path_params["job_id"])
        except HlsvaultError as error:
            return refused(error)
        body = record.to_dict()
        body["progress"] = round(metrics.job_progress(record), 4)
        body["retry_of"] = record.fields.get("retry_of")
        body["retried_as"] = record.fields.get("retried_as")
        return JSONResponse(body, headers=NO_STORE)

    def fleet(self, request: Request) -> Response:
        fleet = self.reader.fleet()
        return JSONResponse(
            {
                "queues": None if fleet.queues is None else [
                    dataclasses.asdict(q) for q in fleet.queues
                ],
                "workers": None if fleet.workers is None else [
                    dataclasses.asdict(w) for w in fleet.workers
                ],
            },
            headers=NO_STORE,
        )

    def metrics(self, request: Request) -> Response:
        fleet = self.reader.fleet()
        text = metrics.render_metrics(
            counts=self.reader.counts(),
            stage_records=self.reader.duration_sample(),
            queues=fleet.queues,
            workers=fleet.workers,
            key_requests=self.reader.key_requests(),
            parked=self.reader.parked(),
            log_lines_dropped=self.reader.log_lines_dropped(),
            now=self.reader.now(),
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
