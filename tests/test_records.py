"""Reading a job record a newer version wrote (a rolling deploy): the plan and the outputs
read in this version, a field it does not know left out and every field it knows intact; the
job spec refuses an option it does not know rather than ignore it. The catalog's version
descriptions read the same way, so an older key server serves what a newer packager wrote.
What no version writes (a damaged record) is refused by name, saying to resubmit."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import pytest

from pipeline import layout
from pipeline.audio import ChunkAudio, ReleasedAudio
from pipeline.errors import CorruptRecord, NewerJobOption
from pipeline.jobs import JobRecord, JobSpec, new_job_spec
from pipeline.media import AudioStream, MediaInfo, SubtitleStream, VideoStream
from pipeline.packaging import AudioGroupAttempt
from pipeline.plan import AudioRendition, Chunk, Rendition
from pipeline.playlists import AssetVersion, DownloadEntry, PublishedSegment, RenditionEntry
from pipeline.segment import Segment, SegmentedRendition
from pipeline.subtitles import SubtitleTrack
from pipeline.thumbnails import Thumbnails

from keyserver_support import VIEWER_IP, AppClient, Library, shared_library

#: A field no version of hlsvault has: what a newer version adds, as this one sees it.
NEWER = "added_by_a_newer_version"


def with_newer_fields(value: Any) -> Any:
    """``value`` (JSON, as the record holds it) with a field of a newer version in every
    object, however nested."""
    if isinstance(value, dict):
        return {**{k: with_newer_fields(v) for k, v in value.items()}, NEWER: [1, "two"]}
    if isinstance(value, list):
        return [with_newer_fields(item) for item in value]
    return value


ENGLISH = AudioStream(codec="aac", profile="LC", channels=2, sample_rate=48000, bit_rate=128000,
                      index=0, language="eng", title="English", default=True, end=5.98)
GERMAN = AudioStream(codec="aac", profile="LC", channels=6, sample_rate=48000, bit_rate=None,
                     index=1, language="deu", title="Deutsch", default=False, end=None)

#: One value of each type the stages read from the job record and its outputs, every field
#: set to something other than its default.
WRITTEN = [
    MediaInfo(
        format_name="mov,mp4,m4a,3gp,3g2,mj2", duration=6.0, size=1234567, bit_rate=1646089,
        video=VideoStream(codec="h264", profile="High", level=40, width=1920, height=1080,
                          frame_rate="30000/1001", pix_fmt="yuv420p", rotation=90,
                          bit_rate=1500000),
        audio=ENGLISH, audio_tracks=(ENGLISH, GERMAN),
        subtitle_tracks=(SubtitleStream(index=0, codec="mov_text", language="fra",
                                        title="Français", default=True, forced=True),),
        video_start=0.021,
    ),
    Rendition(name="720p", width=1280, height=720, copy=False, video_kbps=2800, audio_kbps=128,
              frame_rate="30000/1001", gop_frames=60, codec="hevc"),
    AudioRendition(name="audio-de", track=1, copy=False, kbps=96, language="de",
                   title="Deutsch", default=False, channels=6),
    Chunk(index=3, start=180.0, duration=60.0, first_segment=30, segments=10),
    SubtitleTrack(name="subs1-fr", language="fr", title="Français", default=True, forced=True,
                  track=None, sidecar="s3://bucket/fr.vtt"),
    SegmentedRendition(
        rendition="720p",
        segments=(Segment(30, "seg_00030.m4s", 6.0, 1_000_000),
                  Segment(31, "seg_00031.m4s", 5.5, 900_000)),
        width=1280, height=720, frame_rate="30000/1001", video_profile="Main",
        video_level=120, audio_codec="aac", audio_profile="LC", init="init.mp4",
        media="video", video_tag="hvc1.1.6.L120.90", channels=2,
    ),
    ReleasedAudio(attempt="a1b2c3", sample_rate=48000, pieces=(
        ChunkAudio(chunk="c003", kbps=128, name="c003-128k.aac", offset=0.0213, frames=2813),
        ChunkAudio(chunk="c003", kbps=64, name="c003-64k.aac", offset=0.0213, frames=2813),
    )),
    AssetVersion(
        asset="film", version="v2", job_id="j1", created_at=1.5e9, key_rotation_segments=2,
        renditions=(RenditionEntry(
            name="audio-de", width=0, height=0, frame_rate="", codecs="mp4a.40.2",
            bandwidth=130_000, average_bandwidth=120_000,
            segments=(PublishedSegment(sequence=0, name="seg_00000.m4s", duration=6.0,
                                       size=96_000, key=0),),
            init="init.mp4", media="audio", group="aud", language="de", title="Deutsch",
            default=True, channels=6, forced=True,
        ),),
        key_server="https://keys.example", container="fmp4", audio_only=True,
        download=DownloadEntry(rendition="720p", size=123, key="downloads/film/v2.mp4"),
        thumbnails=Thumbnails(tile_width=160, tile_height=90, columns=5, rows=5,
                              sheets=("sheet_000.jpg",), cues=((0.0, 6.0),)),
    ),
]


class TestARecordANewerVersionWrote:
    @pytest.mark.parametrize("written", WRITTEN, ids=lambda value: type(value).__name__)
    def test_reads_with_every_known_field_intact(self, written: Any) -> None:
        """A value a newer version wrote with fields this one does not know, at every level
        of nesting, reads as the same value: the unknown fields left out, none lost."""
        data = with_newer_fields(json.loads(json.dumps(written.to_dict())))
        assert NEWER in data

        assert type(written).from_dict(data) == written

    def test_a_media_info_from_before_every_audio_track_was_kept_still_reads(self) -> None:
        """A media record of the oldest shape (no ``audio_tracks``, no ``end``) with a newer
        version's fields reads too: its one audio stream, its video intact."""
        data = with_newer_fields(json.loads(json.dumps(WRITTEN[0].to_dict())))
        del data["audio_tracks"]
        del data["audio"]["end"]

        info = MediaInfo.from_dict(data)

        assert info.audio_tracks == (replace(ENGLISH, end=None),)
        assert info.video == WRITTEN[0].video

    def test_the_job_spec_refuses_an_option_it_does_not_know(self) -> None:
        """An option this version does not know would be silently dropped (a job packaged
        without what was asked): the spec refuses to read instead, naming the option and
        saying to upgrade the workers; a retry may find a newer worker (transient)."""
        spec = new_job_spec("/videos/film.mp4", asset="film")

        with pytest.raises(NewerJobOption, match=NEWER) as refused:
            JobSpec.from_dict({**spec.to_dict(), NEWER: True})

        assert "upgrade the workers" in str(refused.value)

    def test_the_options_it_names_are_bounded(self) -> None:
        """The option names are whatever a submitter wrote: a few are named, each cut short,
        and the rest counted."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        hostile = {f"{index}{'x' * 10_000}": True for index in range(50)}

        with pytest.raises(NewerJobOption) as refused:
            JobSpec.from_dict({**spec.to_dict(), **hostile})

        said = str(refused.value)
        assert len(said) < 600 and "and 45 more" in said and "upgrade the workers" in said


def garblings(written: Any) -> list[tuple[str, Any]]:
    """``written`` (as the record holds it) damaged three ways: not an object, its first
    field without a default missing, its first text or number field the other kind."""
    data = json.loads(json.dumps(written.to_dict()))
    needed = next(f.name for f in fields(written)
                  if f.default is MISSING and f.default_factory is MISSING)
    name, value = next((name, value) for name, value in data.items()
                       if isinstance(value, str | int | float) and not isinstance(value, bool))
    return [("a-list", [data]),
            ("missing", {k: v for k, v in data.items() if k != needed}),
            ("wrong-kind", {**data, name: "5" if isinstance(value, int | float) else 5})]


#: A spec as this version writes it, to damage one field of.
SPEC = {"job_id": "j1", "asset": "film", "source": "/videos/film.mp4", "version": "v1"}


class TestADamagedRecord:
    @pytest.mark.parametrize("written, damage, data", [
        (written, damage, data) for written in WRITTEN for damage, data in garblings(written)
    ], ids=lambda value: type(value).__name__ if not isinstance(value, str | list | dict)
        else value if isinstance(value, str) else "")
    def test_is_refused_naming_the_record_and_saying_to_resubmit(
        self, written: Any, damage: str, data: Any
    ) -> None:
        """A value no version writes (not an object, a field it needs missing, a field of the
        wrong kind) is a permanent error naming the record and saying to resubmit the job
        (to package the asset again, for a version's description): the job fails at once
        with it, not after retries of an AttributeError, and never runs on with a number
        where a name goes."""
        with pytest.raises(CorruptRecord, match=type(written).__name__) as refused:
            type(written).from_dict(data)

        mend = ("package the asset again" if isinstance(written, AssetVersion)
                else "resubmit the job")
        assert mend in str(refused.value)

    @pytest.mark.parametrize("data", [
        [1, 2], "spec",
        {"job_id": "j1", "source": "/videos/film.mp4", "version": "v1"},
        {"job_id": "j1", "asset": 5, "source": "/videos/film.mp4", "version": "v1"},
        {"job_id": "j1", "asset": "film", "source": "/videos/film.mp4", "version": "v1",
         "subtitles": 5},
        {**SPEC, "subtitle_names": 5},
        {**SPEC, "subtitles": [["en", "a.vtt"], ["fr", "b.vtt"]], "subtitle_names": "ab"},
        {**SPEC, "subtitles": [["en", "a.vtt"]], "subtitle_names": [5]},
        {**SPEC, "subtitles": {"en": "a.vtt"}},
        {**SPEC, "subtitles": "en"},
        {**SPEC, "subtitles": [["en", 5]]},
        {**SPEC, "subtitles": [["en", "a.vtt", "b.vtt"]]},
    ], ids=["a-list", "text", "no-asset", "asset-a-number", "subtitles-a-number",
            "subtitle-names-a-number", "subtitle-names-text", "subtitle-name-a-number",
            "subtitles-an-object", "subtitles-text", "subtitle-source-a-number",
            "subtitles-a-triple"])
    def test_a_damaged_job_spec_is_refused_saying_to_resubmit(self, data: Any) -> None:
        """Its sidecar subtitles included: a list of text, a list of pairs of text, never
        a number's TypeError, an object's keys or a text's letters read as languages."""
        with pytest.raises(CorruptRecord, match="JobSpec") as refused:
            JobSpec.from_dict(data)

        assert "resubmit the job" in str(refused.value)

    def test_each_read_of_such_a_spec_raises_an_error_of_its_own(self) -> None:
        """The record is read by many threads (the ops app's pool, a worker's): each read of
        its spec raises a new error with the same message, never one shared instance whose
        traceback and context every raise rewrites."""
        record = JobRecord.from_fields({"spec": "[1, 2]"}, job_id="j1")
        raised = []
        for _ in range(2):
            with pytest.raises(CorruptRecord, match="resubmit the job") as refused:
                _ = record.spec
            raised.append(refused.value)

        assert raised[0] is not raised[1] and str(raised[0]) == str(raised[1])


    def test_a_size_list_missing_for_a_hostile_rendition_name_is_named_bounded(self) -> None:
        """An attempt record whose sizes miss a rendition named by whatever wrote it (10,000
        characters here) is refused naming that rendition cut short, quoted: the job's error
        stays a line a person reads."""
        [rendition] = [w for w in WRITTEN if isinstance(w, SegmentedRendition)]
        hostile = "x" * 10_000
        attempt = {"attempt": "a1", "produced": {hostile: rendition.to_dict()}, "sizes": {}}

        with pytest.raises(CorruptRecord, match="resubmit the job") as refused:
            AudioGroupAttempt.from_dict(attempt)

        said = str(refused.value)
        assert f"of {'x' * 64!r}" in said and len(said) < 400


class TestACatalogANewerPackagerWrote:
    def test_its_playlists_and_keys_are_served(
        self, tmp_path_factory: pytest.TempPathFactory, copy_clip: Path, tmp_path: Path
    ) -> None:
        """A version description with a newer version's field in every object (the version,
        each rendition, each segment) is served as before: master, variant and key, 200."""
        library: Library = shared_library(tmp_path_factory, copy_clip).copy(tmp_path)
        described = Path(library.settings.vault) / layout.version_description_key(
            "film", library.version)
        described.write_text(json.dumps(with_newer_fields(json.loads(described.read_text()))))
        token = library.token()

        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            answers = [client.get(path, params={"token": token})
                       for path in (library.master_path(), library.variant_path(),
                                    library.key_path(0))]

        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert answers[2].content == library.key(0)

    @pytest.mark.parametrize("reader, status, says", [
        (None, 200, None), (1, 200, None), (2, 503, "upgrade the key servers"),
        (99, 503, "upgrade the key servers"), ("2", 503, "unreadable description format"),
        (True, 503, "unreadable description format"), (0, 503, "unreadable description format"),
    ])
    def test_one_that_needs_a_newer_reader_is_refused_with_what_to_do(
        self, tmp_path_factory: pytest.TempPathFactory, copy_clip: Path, tmp_path: Path,
        reader: Any, status: int, says: str | None,
    ) -> None:
        """A version whose ``reader`` names a description format newer than this key server
        knows (a field whose meaning it must not ignore), or no format at all, is not served
        wrongly: its master and variant playlists answer 503, the master's body says to
        upgrade the key servers first; its keys, which no description format changes, are
        still served. A description without the field (written before it was kept) or at this
        format is served."""
        library: Library = shared_library(tmp_path_factory, copy_clip).copy(tmp_path)
        described = Path(library.settings.vault) / layout.version_description_key(
            "film", library.version)
        data = json.loads(described.read_text())
        data.pop("reader", None)
        if reader is not None:
            data["reader"] = reader
        described.write_text(json.dumps(data))
        token = library.token()

        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            answers = [client.get(path, params={"token": token})
                       for path in (library.master_path(), library.variant_path(),
                                    library.key_path(0))]

        assert [answer.status_code for answer in answers] == [status, status, 200]
        assert answers[2].content == library.key(0)
        if says is not None:
            assert says in answers[0].text


class TestAGarbledVersionDescription:
    @pytest.mark.parametrize("text", [
        "not json {",
        "[]",
        json.dumps({"asset": "film", "renditions": "360p"}),
        json.dumps({"asset": "film", "renditions": [{"name": "360p", "segments": {"a": 1}}]}),
        json.dumps({"asset": "film", "renditions": [{"segments": []}]}),
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"reader": [[[1]]], "version": "v" * 100_000}),
    ], ids=["not-json", "a-list", "renditions-text", "segments-object", "no-name",
            "deeply-nested", "reader-nested-and-huge-version"])
    def test_its_playlists_answer_503_saying_what_to_do_and_its_keys_are_served(
        self, tmp_path_factory: pytest.TempPathFactory, copy_clip: Path, tmp_path: Path,
        text: str,
    ) -> None:
        """A version description that is not what a packager writes (a damaged or hand-edited
        vault: not JSON, the wrong kind of value, nested past any parser's depth, oversized)
        is never a 500: its playlists answer 503 with a short body that says what to do, and
        its keys, which do not depend on it, are served."""
        library: Library = shared_library(tmp_path_factory, copy_clip).copy(tmp_path)
        described = Path(library.settings.vault) / layout.version_description_key(
            "film", library.version)
        described.write_text(text)
        token = library.token()

        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            answers = [client.get(path, params={"token": token})
                       for path in (library.master_path(), library.variant_path(),
                                    library.key_path(0))]

        assert [answer.status_code for answer in answers] == [503, 503, 200]
        assert answers[2].content == library.key(0)
        for answer in answers[:2]:
            assert len(answer.content) < 1000
            assert "unreadable" in answer.text
