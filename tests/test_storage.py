"""Which text is a URL, and which URLs name S3: one rule each (``pipeline.storage.url_scheme``,
``is_s3_url``) for stores, sources, sidecars and job requests, so that a URL means the same
thing wherever it is given; an S3 URL without the bucket (or key) a place needs is refused
there, with the form to use."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import BadSpec, ConfigurationError, InvalidSource
from pipeline.ingest import parse_job_request
from pipeline.sources import ffmpeg_target, split_s3_url
from pipeline.storage import check_store_url, is_s3_url, open_store, s3_parts, url_scheme
from pipeline.subtitles import check_sidecar_source


class TestWhatAUrlIs:
    @pytest.mark.parametrize(("text", "scheme"), [
        ("s3://bucket/key", "s3"), ("HTTP://host/x.mp4", "HTTP"), ("file:///x.mp4", "file"),
        ("git+ssh://host/x", "git+ssh"), ("media/a://b.mp4", None), ("/data/s3://x", None),
        ("s3:/bucket/key", None), ("1x://host", None), ("talk.mp4", None), ("", None),
    ])
    def test_a_url_is_a_scheme_and_two_slashes_at_the_start(
        self, text: str, scheme: str | None
    ) -> None:
        """``://`` further on does not make a URL: ``media/a://b.mp4`` is a local path."""
        assert url_scheme(text) == scheme

    def test_a_store_path_with_two_slashes_further_on_is_a_local_directory(self) -> None:
        assert check_store_url("data/s3://x") == "data/s3://x"


class TestWhatAnS3UrlIs:
    @pytest.mark.parametrize("url", ["s3://bucket/key", "s3://bucket", "s3://", "s3:///key"])
    def test_the_lower_case_scheme_names_s3(self, url: str) -> None:
        """Anything starting ``s3://`` is an S3 URL, even one missing its bucket (refused by
        whoever needs the bucket, below): never a local path."""
        assert is_s3_url(url)

    @pytest.mark.parametrize("url", ["S3://bucket/key", "/data/s3://x", "s3:/bucket/key",
                                     "https://bucket.s3.amazonaws.com/key", "bucket/key"])
    def test_nothing_else_does(self, url: str) -> None:
        assert not is_s3_url(url)

    @pytest.mark.parametrize("source", ["S3://bucket/key.mp4", "S3://user:secret@bucket/k"])
    def test_a_source_in_upper_case_is_refused_with_the_lower_case_form(self, source: str) -> None:
        """Not looked for as a local path (the refusal would say "not found"), and shown by
        its scheme alone."""
        with pytest.raises(InvalidSource, match="S3 URLs are lower case, s3://bucket/key") as no:
            ffmpeg_target(source)
        assert "not found" not in str(no.value) and "secret" not in str(no.value)

    def test_a_source_of_another_scheme_is_refused_naming_the_forms(self) -> None:
        with pytest.raises(InvalidSource, match=r"ftp://… is neither a local path, an http"):
            ffmpeg_target("ftp://host/key.mp4")

    @pytest.mark.parametrize(("source", "says"), [
        ("HTTP://host/x.mp4", "HTTP://…: write the scheme in lower case: http://…"),
        ("Https://user:secret@host/x.mp4", "Https://…: write the scheme in lower case: https://…"),
        ("file:///videos/x.mp4", "file://…: give the path itself"),
    ])
    def test_a_source_of_a_scheme_meant_otherwise_says_how_to_write_it(
        self, source: str, says: str
    ) -> None:
        """Not "neither a local path, an http(s) URL nor …", which an http URL is."""
        with pytest.raises(InvalidSource) as refused:
            ffmpeg_target(source)
        assert says in str(refused.value)
        assert "neither" not in str(refused.value) and "secret" not in str(refused.value)

    def test_a_source_with_two_slashes_further_on_is_looked_for_as_a_local_path(self) -> None:
        with pytest.raises(InvalidSource, match=r"source not found: media/a://b\.mp4"):
            ffmpeg_target("media/a://b.mp4")

    def test_its_parts_are_the_bucket_and_the_rest(self) -> None:
        assert s3_parts("s3://bucket/a/b.mp4") == ("bucket", "a/b.mp4")
        assert s3_parts("s3://bucket") == ("bucket", "")
        with pytest.raises(ValueError, match="not an S3 URL"):
            s3_parts("S3://bucket/key")


class TestAnS3UrlWithoutItsBucketOrKey:
    @pytest.mark.parametrize("url", ["s3://", "s3:///prefix"])
    def test_a_store_without_a_bucket_refuses_to_open(self, url: str) -> None:
        with pytest.raises(ConfigurationError, match="names no bucket"):
            open_store(url)

    @pytest.mark.parametrize("url", ["S3://bucket", "https://bucket.s3.amazonaws.com"])
    def test_a_store_url_of_another_scheme_is_not_taken_for_a_directory(
        self, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConfigurationError, match="s3://bucket/prefix"):
            open_store(url)
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(("url", "shown"), [
        ("https://user:secret@bucket.example/prefix", "(https://…)"),
        ("S3://user:secret@bucket/prefix", "(S3://…)"),
        ("averyveryverylongscheme://user:secret@host/bucket", "(a URL)"),
    ])
    def test_a_refused_store_url_is_named_by_its_scheme_alone(self, url: str, shown: str) -> None:
        """A mistyped URL may hold a credential: the refusal, which lands in logs, shows
        none of it."""
        with pytest.raises(ConfigurationError, match="s3://bucket/prefix") as refused:
            open_store(url)
        assert shown in str(refused.value)
        assert "secret" not in str(refused.value) and "user" not in str(refused.value)

    @pytest.mark.parametrize("url", ["s3://", "s3:///key", "s3://bucket", "s3://bucket/"])
    def test_a_source_needs_both(self, url: str) -> None:
        with pytest.raises(InvalidSource, match="s3://bucket/key"):
            split_s3_url(url)
        # a sidecar's is a fault of the spec, as its other faults are, and names the sidecar
        with pytest.raises(BadSpec, match=r"subtitle file .* is not of the form s3://bucket/key"):
            check_sidecar_source(url)
        with pytest.raises(BadSpec, match=r"subtitle file .* is not of the form s3://bucket/key"):
            parse_job_request({"source": "s3://in/talk.mp4",
                               "subtitles": [{"language": "de", "source": url}]})
        with pytest.raises(BadSpec, match="s3://bucket/key"):
            parse_job_request({"source": url})

    def test_a_request_names_its_source_in_lower_case(self) -> None:
        with pytest.raises(BadSpec, match='like "s3://bucket/key"'):
            parse_job_request({"source": "S3://bucket/key.mp4"})
        assert parse_job_request({"source": "s3://bucket/key.mp4"}).key == "key.mp4"


class TestALocalCopyMadeAgain:
    def test_leaves_the_one_file_and_nothing_beside_it(self, tmp_path: Path) -> None:
        """A server-side copy (a hard link) made again onto a key that holds that very file
        (a stage placing the same attempt twice) leaves the key as it was and no temporary
        file beside it."""
        store = open_store(str(tmp_path / "work"))
        store.put_bytes("attempt/seg_00000.ts", b"sealed")
        assert store.copy_from(store, "attempt/seg_00000.ts", "enc/seg_00000.ts")
        assert store.copy_from(store, "attempt/seg_00000.ts", "enc/seg_00000.ts")

        assert store.get_bytes("enc/seg_00000.ts") == b"sealed"
        assert sorted(p.name for p in (tmp_path / "work" / "enc").iterdir()) == ["seg_00000.ts"]
