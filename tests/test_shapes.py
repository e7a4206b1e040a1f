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
        ({"audio_only": {"nested": True}}, "audio_only"),
        ({"container": 3}, "container"),
        ({"container": ["ts"]}, "container"),
        ({"codec": {"name": "hevc"}}, "codec"),
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
        ({"codec": "h264; rm -rf /"}, "unknown codec"),
        ({"container": "ts" * 10_000}, "unknown container"),
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

        with pytest.raises(BadSpec, match=needs) as refused:
            new_job_spec("/media/talk.mp4", **options)  # type: ignore[arg-type]
        assert len(str(refused.value)) < 300  # the refusal quotes at most a bit of the value

    def test_a_valid_shape_is_kept_in_the_spec(self) -> None:
        from pipeline.jobs import JobSpec, new_job_spec

        spec = new_job_spec("/media/talk.mp4", container="fmp4", codec="hevc", audio_only=True)
        again = JobSpec.from_dict(spec.to_dict())
        assert (again.container, again.codec, again.audio_only) == ("fmp4", "hevc", True)


class TestSourceTrackMetadata:
    """A source's track tags reach every master playlist (LANGUAGE, NAME): hostile ones are
    dropped or cleaned, never written as they came."""

    @pytest.mark.parametrize("tag, expected", [
        ("eng", "en"), ("de-CH", "de-CH"), ("", None), (None, None),
        ("日本", None),  # not ASCII: not an RFC 5646 tag
        ('en",URI="http://evil', None), ("en\nEXT-X-KEY", None), ("a" * 9, None),
        ("x", None), ("x1", None), ("en_US", "en-US"),  # the rule sidecars keep too
    ])
    def test_languages_are_tags_or_nothing(self, tag: str | None, expected: str | None) -> None:
        from pipeline.plan import hls_language

        assert hls_language(tag) == expected

    def test_titles_are_printable_and_capped(self) -> None:
        from pipeline.plan import MAX_TITLE_CHARS, _shown_title

        assert _shown_title("Director's\ncut\x00\t  (5.1)") == "Director's cut (5.1)"
        assert len(_shown_title("x" * 10_000)) == MAX_TITLE_CHARS
        assert _shown_title("\n\r\x00") == ""
