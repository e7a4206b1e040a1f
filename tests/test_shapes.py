"""Media shape options (container, codec, audio-only) from the CLI's spec and the webhook."""

from __future__ import annotations

import pytest


class TestShapeOptions:
    """--container, --codec and --audio-only from the CLI's spec and the webhook's request."""

    def test_webhook_fields_reach_the_request(self) -> None:
        from pipeline.ingest import parse_request

        (request,) = parse_request({"source": "s3://b/talk.mkv", "container": "fmp4",
                                    "codec": "hevc", "audio_only": True})
        assert (request.container, request.codec, request.audio_only) == ("fmp4", "hevc", True)

    @pytest.mark.parametrize("document, field", [
        ({"audio_only": "yes"}, "audio_only"),
        ({"container": 3}, "container"),
    ])
    def test_malformed_webhook_fields_are_refused(
        self, document: dict[str, object], field: str
    ) -> None:
        from pipeline.errors import BadSpec
        from pipeline.ingest import parse_request

        with pytest.raises(BadSpec, match=field):
            parse_request({"source": "s3://b/talk.mkv", **document})

    @pytest.mark.parametrize("options, needs", [
        ({"container": "mkv"}, "unknown container"),
        ({"codec": "av1"}, "unknown codec"),
        ({"codec": "hevc"}, "--container fmp4"),
        ({"codec": "hevc", "container": "fmp4", "ladder": "copy"}, "--ladder default"),
        ({"container": "fmp4", "download": "top"}, "--container ts"),
        ({"audio_only": True, "download": "top"}, "--audio-only"),
    ])
    def test_shapes_that_do_not_go_together_are_refused(
        self, options: dict[str, object], needs: str
    ) -> None:
        from pipeline.errors import BadSpec
        from pipeline.jobs import new_job_spec

        with pytest.raises(BadSpec, match=needs):
            new_job_spec("/media/talk.mp4", **options)  # type: ignore[arg-type]

    def test_a_valid_shape_is_kept_in_the_spec(self) -> None:
        from pipeline.jobs import JobSpec, new_job_spec

        spec = new_job_spec("/media/talk.mp4", container="fmp4", codec="hevc", audio_only=True)
        again = JobSpec.from_dict(spec.to_dict())
        assert (again.container, again.codec, again.audio_only) == ("fmp4", "hevc", True)
