"""The stages as plain functions over real stores and real ffmpeg, and the flow's one failure
path: an overlapping segment attempt never reaches encrypt, a poison message fails its job, and
a job that runs out of retries leaves no scratch behind."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from pipeline import aes, layout, packaging
from pipeline.crypto import iv_for_sequence
from pipeline.errors import JobEnded, StorageRefused, TransientError
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.media import MediaInfo
from pipeline.plan import Rendition
from pipeline.playlists import key_index
from pipeline.publish import discard_work
from pipeline.segment import segment_audio_renditions
from pipeline.services import Services, build_services
from pipeline.settings import load_settings
from pipeline.sources import ffmpeg_target
from workers.embedded import run_embedded
from workers.runtime import Runtime, build_runtime

from support import (
    RemoteStandIn,
    decrypt_bytes,
    encrypt_bytes,
    frame_hashes,
    framemd5,
    lavfi_clip,
    work_files,
)


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")}))


@pytest.fixture
def probed(services: Services, copy_clip: Path) -> tuple[JobSpec, str]:
    """A copy-ladder job recorded and probed: ready to segment its one rendition."""
    spec = new_job_spec(str(copy_clip), asset="film", ladder="copy")
    services.jobs.create(spec)
    [rendition] = packaging.probe_source(services, spec).renditions
    return spec, rendition.name


#: A remux is one chunk.
CHUNK = "c000"


def stored_files(services: Services) -> dict[str, tuple[int, int, bytes]]:
    """Every file of the (local) work store, origin and vault: inode, modification time and
    bytes (a rewrite in place changes the time, a replacing write the inode)."""
    found = {}
    settings = services.settings
    for root in (settings.work, settings.origin, settings.vault):
        for path in Path(root).rglob("*"):
            if path.is_file():
                stat = path.stat()
                found[str(path)] = (stat.st_ino, stat.st_mtime_ns, path.read_bytes())
    return found


def produced_output(services: Services, spec: JobSpec) -> dict[str, Any]:
    """The chunk's ``produced`` output: the attempt that won, and its segments."""
    name = layout.produced_output(CHUNK)
    produced: dict[str, Any] = services.jobs.outputs(spec.job_id, [name])[name]
    return produced


def _segmented_plain(
    services: Services, spec: JobSpec
) -> tuple[Rendition, list[dict[str, Any]], list[bytes]]:
    """``spec``'s job created, probed and segmented without sealing: its one rendition, that
    rendition's produced segments and each segment's plain bytes, in order."""
    services.jobs.create(spec)
    [rendition] = packaging.probe_source(services, spec).renditions
    packaging.segment(services, spec, CHUNK, seal=False)
    return _segments_of(services, spec, rendition)


def _segments_of(
    services: Services, spec: JobSpec, rendition: Rendition
) -> tuple[Rendition, list[dict[str, Any]], list[bytes]]:
    """The segmented job's ``rendition``, its produced segments and each one's bytes in the
    work store's attempt, in order."""
    produced = produced_output(services, spec)
    attempt = layout.chunk_rendition_prefix(spec.job_id, CHUNK, produced["attempt"], rendition.name)
    segments: list[dict[str, Any]] = produced["produced"][rendition.name]["segments"]
    plain = [services.work.get_bytes(f"{attempt}/{seg['name']}") for seg in segments]
    return rendition, segments, plain


def _decrypted(services: Services, spec: JobSpec, rendition: str) -> list[bytes]:
    key = services.keys.get(spec.asset, spec.version, 0)
    produced = produced_output(services, spec)
    return [
        decrypt_bytes(
            services.work.get_bytes(layout.encrypted_key(spec.job_id, rendition, seg["name"])),
            key, iv_for_sequence(seg["sequence"]),
        )
        for seg in produced["produced"][rendition]["segments"]
    ]


class TestEncryptStage:
    def test_each_segment_is_its_own_cbc_stream_under_its_own_key(
        self, services: Services
    ) -> None:
        """Given a chunk of more segments than a thread's lanes, with keys rotating every five
        segments, when the encrypt stage encrypts them (several side by side), then each
        segment's ciphertext is byte for byte that segment alone encrypted under its key and
        its sequence number's IV: what the one-segment-at-a-time stage wrote."""
        clip = lavfi_clip("twelve-seconds.mp4", seconds=12)
        spec = new_job_spec(str(clip), asset="lanes", ladder="copy", segment_seconds=1,
                            key_rotation_segments=5)
        rendition, segments, plain = _segmented_plain(services, spec)

        packaging.encrypt(services, spec, CHUNK)

        assert len(segments) > aes.LANES
        keys = [services.keys.get(spec.asset, spec.version, key_index(seg["sequence"], 5))
                for seg in segments]
        assert len(set(keys)) > 1
        for seg, data, key in zip(segments, plain, keys, strict=True):
            encrypted = services.work.get_bytes(
                layout.encrypted_key(spec.job_id, rendition.name, seg["name"])
            )
            assert encrypted == encrypt_bytes(data, key, iv_for_sequence(seg["sequence"]))

    def test_a_remote_work_store_holds_one_batch_in_scratch_at_a_time(
        self, services: Services, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a chunk of three batches' segments on a remote work store (one encrypting
        thread of four lanes: a batch is four segments), when the encrypt stage runs, then its
        scratch never holds more than one batch's files (each segment is encrypted in place
        in its fetched copy), every ciphertext is that segment alone encrypted under its key
        and IV, progress ends at 1, and every fetch and put ran in the stage's log context
        (its job_id). The store's plain segments are untouched, so a redelivered stage
        writes the same ciphertext again."""
        monkeypatch.setattr(packaging, "ENCRYPT_THREADS", 1)
        monkeypatch.setattr(aes, "LANES", 4)
        batch = 4
        clip = lavfi_clip("twelve-seconds.mp4", seconds=12)
        spec = new_job_spec(str(clip), asset="batches", ladder="copy", segment_seconds=1)
        rendition, segments, plain = _segmented_plain(services, spec)
        remote = RemoteStandIn(services.work)
        progress: list[float] = []

        with structlog.contextvars.bound_contextvars(job_id=spec.job_id):
            packaging.encrypt(replace(services, work=remote), spec, CHUNK,
                              on_progress=progress.append)

        assert len(segments) >= 3 * batch
        assert 0 < remote.most_in_scratch <= batch
        key = services.keys.get(spec.asset, spec.version, 0)

        def check_ciphertexts() -> None:
            for seg, data in zip(segments, plain, strict=True):
                encrypted = services.work.get_bytes(
                    layout.encrypted_key(spec.job_id, rendition.name, seg["name"])
                )
                assert encrypted == encrypt_bytes(data, key, iv_for_sequence(seg["sequence"]))

        check_ciphertexts()
        assert progress[-1] == 1.0
        assert remote.contexts
        assert all(context.get("job_id") == spec.job_id for context in remote.contexts)
        _, _, plain_after = _segments_of(services, spec, rendition)
        assert plain_after == plain

        packaging.encrypt(replace(services, work=remote), spec, CHUNK)  # redelivered

        check_ciphertexts()


class RecordsWrites(RemoteStandIn):
    """:class:`RemoteStandIn` (a remote work store, as S3 is to a stage) that records the key
    of every object written to it, by whichever call."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.written: list[str] = []

    def put_file(self, key: str, path: Path, **headers: Any) -> None:
        self.written.append(key)
        super().put_file(key, path, **headers)

    def put_bytes(self, key: str, data: bytes, **headers: Any) -> None:
        self.written.append(key)
        self._store.put_bytes(key, data, **headers)

    def copy_from(self, source: Any, source_key: str, key: str, **headers: Any) -> bool:
        self.written.append(key)
        copied: bool = self._store.copy_from(source, source_key, key, **headers)
        return copied


#: The audio group's shapes: MPEG-TS, and fMP4 with an init segment per rendition.
AUDIO_CONTAINERS = ["ts", "fmp4"]


def audio_group_job(services: Services, clip: Path, container: str) -> JobSpec:
    """A remux of the two-language clip into 1 s segments, a new key every 2: its audio is two
    renditions of their own (an audio group) of six segments or more each, under three keys
    or more."""
    spec = new_job_spec(str(clip), asset="langs", ladder="copy", container=container,
                        segment_seconds=1, key_rotation_segments=2)
    services.jobs.create(spec)
    assert [a.name for a in packaging.probe_source(services, spec).audio_renditions] == \
        ["audio0-en", "audio1-de"]
    return spec


def plain_cut(services: Services, spec: JobSpec, out_dir: Path) -> dict[str, list[bytes]]:
    """The audio group cut by the same ffmpeg command and left plain: each rendition's init
    segment (fMP4), then its media segments, in order."""
    job = services.jobs.get(spec.job_id)
    info = MediaInfo.from_dict(job.json_field("media"))
    produced = segment_audio_renditions(
        ffmpeg_target(spec.source)[0], packaging.job_audio_renditions(job), out_dir, info=info,
        segment_seconds=spec.segment_seconds, container=spec.container, timeout=120,
    )
    return {name: [(out_dir / name / file_name).read_bytes()
                   for file_name in ([r.init] if r.init else []) + [s.name for s in r.segments]]
            for name, r in produced.items()}


class TestAudioGroup:
    """The audio stage of separate audio renditions cuts them whole, encrypts each media
    segment in place in its own attempt and places the ciphertext where encrypt puts its
    output: the bytes the encrypt stage wrote, with no plain segment ever put in a remote work
    store."""

    def _published(
        self, services: Services, spec: JobSpec
    ) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
        """The record the stage wrote, and each rendition as a player reads it: the init
        segment as it is, then each media segment decrypted with its key and its sequence
        number's IV (checked against the reference encryption of that plaintext)."""
        name = layout.audio_group_output()
        record: dict[str, Any] = services.jobs.outputs(spec.job_id, [name])[name]
        decrypted: dict[str, list[bytes]] = {}
        for rendition, item in record["produced"].items():
            parts = decrypted.setdefault(rendition, [])
            if item["init"] is not None:
                parts.append(services.work.get_bytes(
                    layout.encrypted_key(spec.job_id, rendition, item["init"])))
            parts += placed_plaintext(services, spec, rendition, item["segments"],
                                      record["sizes"][rendition])
        return record, decrypted

    def test_a_job_cancelled_while_ffmpeg_cuts_gets_nothing_placed(
        self, services: Services, two_audio_clip: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a job an operator cancels while its audio group is being cut, when ffmpeg
        has finished, then the stage stops saying so, nothing is placed where the encrypt
        stage's output goes (the cancellation had discarded the job's work) and its attempt
        is deleted: nothing of the job is left in the work store."""
        spec = audio_group_job(services, two_audio_clip, "ts")
        cut = packaging.segment_audio_renditions

        def cancelled_meanwhile(*args: Any, **kwargs: Any) -> Any:
            produced = cut(*args, **kwargs)
            assert services.jobs.cancel(spec.job_id)
            return produced

        monkeypatch.setattr(packaging, "segment_audio_renditions", cancelled_meanwhile)

        with pytest.raises(JobEnded, match="ended while its audio was being cut"):
            packaging.audio_group(services, spec, services.jobs.get(spec.job_id))

        assert services.work.list(layout.job_prefix(spec.job_id)) == []

    def test_a_put_the_store_refuses_fails_the_stage_without_trying_the_rest(
        self, services: Services, two_audio_clip: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a remote work store that refuses every put (an outage, a policy), when the
        audio group places its segments two at a time, then the stage fails with the store's
        error after the puts already started (the first, the other thread's, and the one the
        first thread took next), not after one try of every segment."""
        monkeypatch.setattr(packaging, "PLACE_CONCURRENCY", 2)
        spec = audio_group_job(services, two_audio_clip, "ts")
        tried: list[str] = []
        lock = threading.Lock()

        class Refuses(RecordsWrites):
            def put_file(self, key: str, path: Path, **headers: Any) -> None:
                with lock:
                    tried.append(key)
                    first = len(tried) == 1
                if not first:
                    # A put still in flight when the first fails (as S3 retries would be):
                    # its thread takes no other meanwhile, whatever the machine's load.
                    time.sleep(1.0)
                raise StorageRefused(f"put of {key} refused")

        with pytest.raises(StorageRefused):
            packaging.audio_group(replace(services, work=Refuses(services.work)), spec,
                                  services.jobs.get(spec.job_id))

        assert 1 <= len(tried) <= 3  # of 14 or more segments

    @pytest.mark.parametrize("container", AUDIO_CONTAINERS)
    def test_a_remote_work_store_is_never_given_a_plain_audio_segment(
        self, services: Services, two_audio_clip: Path, tmp_path: Path, container: str
    ) -> None:
        """Given a remote work store, when the audio group is cut, then the store was given
        nothing but its attempt's files and those files placed where encrypt's output goes,
        each file of the attempt the very bytes placed (ciphertext, clear init segments), and
        each published segment is the reference encryption, under its key and IV (three keys
        or more), of the same bytes as a plain cut: the record's sizes are the ciphertext's
        and the plaintext's."""
        spec = audio_group_job(services, two_audio_clip, container)
        remote = RecordsWrites(services.work)
        job = services.jobs.get(spec.job_id)

        with structlog.contextvars.bound_contextvars(job_id=spec.job_id):
            written = packaging.audio_group(replace(services, work=remote), spec, job)

        record, decrypted = self._published(services, spec)
        attempt = layout.audio_attempt_prefix(spec.job_id, record["attempt"]) + "/"
        enc = layout.encrypted_prefix(spec.job_id, "")
        stored = {key.removeprefix(attempt) for key in remote.written if key.startswith(attempt)}
        placed = {key.removeprefix(enc) for key in remote.written if key.startswith(enc)}
        assert stored == placed and len(set(remote.written)) == 2 * len(stored)
        for key in stored:
            assert services.work.get_bytes(attempt + key) == services.work.get_bytes(enc + key)
        assert decrypted == plain_cut(services, spec, tmp_path / "plain")
        sequences = [seg["sequence"] for item in record["produced"].values()
                     for seg in item["segments"]]
        assert written == len(sequences) >= 12
        assert len({key_index(sequence, 2) for sequence in sequences}) >= 3
        assert all(context.get("job_id") == spec.job_id for context in remote.contexts)

    @pytest.mark.parametrize("container", AUDIO_CONTAINERS)
    @pytest.mark.parametrize("store", ["local", "remote"])
    def test_a_redelivered_audio_group_publishes_a_group_that_decodes(
        self, services: Services, two_audio_clip: Path, tmp_path: Path, container: str,
        store: str, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Given an audio group cut and named once, whose delivery then died before its
        segments were all placed (here: none is), when its stage is delivered again, then it
        cuts nothing (no ffmpeg runs), the record still names the first attempt, and each
        rendition decrypted is the plain cut, byte for byte, which decodes to every audio
        frame of the source track (so nothing was encrypted twice)."""
        spec = audio_group_job(services, two_audio_clip, container)
        stage = services if store == "local" else replace(services, work=RemoteStandIn(
            services.work))
        job = services.jobs.get(spec.job_id)
        packaging.audio_group(stage, spec, job)
        first, _ = self._published(services, spec)
        services.work.delete_prefix(layout.encrypted_prefix(spec.job_id, ""))

        def cut_again(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a redelivery after the group was named cut it again")

        monkeypatch.setattr(packaging, "segment_audio_renditions", cut_again)
        packaging.audio_group(stage, spec, job)
        monkeypatch.undo()

        record, decrypted = self._published(services, spec)
        assert record == first
        assert decrypted == plain_cut(services, spec, tmp_path / "plain")
        for position, name in enumerate(["audio0-en", "audio1-de"]):
            joined = tmp_path / f"{name}.{'mp4' if container == 'fmp4' else 'ts'}"
            joined.write_bytes(b"".join(decrypted[name]))
            decoded = frame_hashes(framemd5(str(joined), stream="0:a:0"))
            # The source's edit list hides the encoder's priming frame from its decoder; the
            # rendition has none, so its decoder hands that frame out first.
            assert decoded[1:] == frame_hashes(
                framemd5(str(two_audio_clip), stream=f"0:a:{position}"))


#: How long a held placement waits for the test to let it go: a stage that never lets it
#: through then goes on, and its test fails on what it asserts instead of hanging.
HOLD_S = 120.0


class HoldsAfterOnePlacedSegment:
    """A work store (``store``, wrapped) whose first media segment written where encrypt puts
    its output (``enc/``) is written, then held until :attr:`go` is set (or HOLD_S): a
    delivery of a stage paused half-way through placing its segments, at an event the test
    waits for (:attr:`placed_one`) instead of a race against the clock."""

    def __init__(self, store: Any, job_id: str) -> None:
        self._store = store
        self._enc = layout.encrypted_prefix(job_id, "")
        self.placed_one = threading.Event()
        self.go = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _placed(self, key: str) -> None:
        if key.startswith(self._enc) and "/seg_" in key and not self.placed_one.is_set():
            self.placed_one.set()
            self.go.wait(HOLD_S)

    def copy_from(self, source: Any, source_key: str, key: str, **headers: Any) -> bool:
        copied: bool = self._store.copy_from(source, source_key, key, **headers)
        if copied:
            self._placed(key)
        return copied

    def put_file(self, key: str, path: Path, **headers: Any) -> None:
        self._store.put_file(key, path, **headers)
        self._placed(key)


class RacingDeliveries:
    """Deliveries of one stage run at once in threads (:meth:`start`), every failure kept
    (:attr:`failures`), the second held once it has cut (:meth:`hold_second_cut`): at
    :attr:`second_cut` it waits for :attr:`second_go` (or HOLD_S), so the test orders the
    two deliveries' claims by events, not by the clock."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = []
        self.second_cut = threading.Event()
        self.second_go = threading.Event()

    def start(self, run: Callable[[], Any]) -> threading.Thread:
        def target() -> None:
            try:
                run()
            except BaseException as error:
                self.failures.append(error)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    def hold_second_cut(
        self, monkeypatch: pytest.MonkeyPatch, cutter: str, second_reads: str
    ) -> None:
        """Patch ``packaging.<cutter>`` so that the delivery whose cut reads
        ``second_reads`` (its first argument) holds once it has cut."""
        cut = getattr(packaging, cutter)

        def second_waits_after_its_cut(source: str, *args: Any, **kwargs: Any) -> Any:
            produced = cut(source, *args, **kwargs)
            if source == second_reads:
                self.second_cut.set()
                self.second_go.wait(HOLD_S)
            return produced

        monkeypatch.setattr(packaging, cutter, second_waits_after_its_cut)


class TestTwoDeliveriesOfAnAudioGroup:
    @pytest.mark.parametrize("container", AUDIO_CONTAINERS)
    @pytest.mark.parametrize("store", ["local", "remote"])
    def test_the_published_group_is_the_first_claim_s_cut_whole(
        self, services: Services, two_audio_clip: Path, retuned_two_audio_clip: Path,
        tmp_path: Path, container: str, store: str, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Given two deliveries of one audio group at once (a redelivery while the first
        still runs) whose cuts differ (the second reads other bytes, as a host with another
        ffmpeg build may cut), the second's cut done before the first claims, when the first
        claims and places one media segment where the playlist and upload read, the second
        then claims and runs to its end, and then the first finishes, then neither fails, the
        record names the first claim's attempt, and every rendition decrypts, segment by
        segment at the sizes the record says, to that delivery's cut, whole (not one segment
        of the other's), and the work store keeps that attempt only: the second's is gone."""
        spec = audio_group_job(services, two_audio_clip, container)
        other = replace(spec, source=str(retuned_two_audio_clip))
        job = services.jobs.get(spec.job_id)
        work = services.work if store == "local" else RemoteStandIn(services.work)
        held = HoldsAfterOnePlacedSegment(work, spec.job_id)
        race = RacingDeliveries()
        race.hold_second_cut(monkeypatch, "segment_audio_renditions",
                             ffmpeg_target(other.source)[0])
        second = race.start(
            lambda: packaging.audio_group(replace(services, work=work), other, job))
        first = None
        try:
            assert race.second_cut.wait(HOLD_S)
            first = race.start(
                lambda: packaging.audio_group(replace(services, work=held), spec, job))
            assert held.placed_one.wait(HOLD_S)
            race.second_go.set()
            second.join(HOLD_S)
            assert not second.is_alive()
        finally:
            race.second_go.set()
            held.go.set()
            second.join(HOLD_S)
            if first is not None:
                first.join(HOLD_S)
        assert race.failures == [] and first is not None and not first.is_alive()
        monkeypatch.undo()

        record, decrypted = TestAudioGroup()._published(services, spec)
        cuts = [plain_cut(services, cut, tmp_path / name)
                for name, cut in (("first", spec), ("second", other))]
        assert cuts[0] != cuts[1]  # the harness: the two deliveries' bytes differ
        assert decrypted == cuts[0]
        # The losing delivery's attempt is discarded: the work store keeps the winner's only.
        winner = layout.audio_attempt_prefix(spec.job_id, record["attempt"]) + "/"
        kept = services.work.list(layout.audio_attempt_prefix(spec.job_id, ""))
        assert kept and all(key.startswith(winner) for key in kept)


@pytest.fixture(scope="module")
def negated_copy_clip() -> Path:
    """:func:`copy_clip`'s shape (length, keyframes, codecs) with its picture negated: a
    source that cuts to other bytes."""
    return lavfi_clip("copy-negated.mp4", seconds=6, extra=["-vf", "negate"])


def published_chunk(services: Services, spec: JobSpec) -> dict[str, list[bytes]]:
    """Each rendition of the chunk as a player reads it: every media segment the ``produced``
    output names, decrypted with its key and its sequence number's IV (checked against the
    reference encryption of that plaintext, at the size the ``sizes`` output says)."""
    name = layout.sizes_output(CHUNK)
    sizes = services.jobs.outputs(spec.job_id, [name])[name]
    return {rendition: placed_plaintext(services, spec, rendition, item["segments"],
                                        sizes[rendition])
            for rendition, item in produced_output(services, spec)["produced"].items()}


def placed_plaintext(
    services: Services, spec: JobSpec, rendition: str, segments: list[dict[str, Any]],
    sizes: list[int],
) -> list[bytes]:
    """Each of ``segments`` as encrypt placed it, decrypted with its key and its sequence
    number's IV: checked against the reference encryption of that plaintext, at the
    ciphertext size ``sizes`` gives and the plain size the segment's record gives."""
    parts = []
    for seg, size in zip(segments, sizes, strict=True):
        key = services.keys.get(spec.asset, spec.version,
                                key_index(seg["sequence"], spec.key_rotation_segments))
        iv = iv_for_sequence(seg["sequence"])
        data = services.work.get_bytes(layout.encrypted_key(spec.job_id, rendition, seg["name"]))
        plain = decrypt_bytes(data, key, iv)
        assert data == encrypt_bytes(plain, key, iv)
        assert (len(data), len(plain)) == (size, seg["size"])
        parts.append(plain)
    return parts


def plain_chunk(services: Services, source: Path, **options: Any) -> dict[str, list[bytes]]:
    """The plain segments a copy-ladder job of ``source`` cuts its chunk into, by rendition."""
    spec = new_job_spec(str(source), asset="reference", ladder="copy", **options)
    rendition, _, plain = _segmented_plain(services, spec)
    return {rendition.name: plain}


class TestTwoDeliveriesOfASegmentStage:
    @pytest.mark.parametrize("store", ["local", "remote"])
    def test_the_published_chunk_is_one_delivery_s_cut_whole(
        self, services: Services, copy_clip: Path, negated_copy_clip: Path, store: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Given two deliveries of one chunk's segment stage at once (a redelivery while the
        first still runs) whose cuts differ (the second reads other bytes, as a host with
        another ffmpeg build may cut), the second started before the first named its
        attempt, when the first has finished and its encryption has placed one segment where
        the playlist and upload read, the second finishes, a redelivered encryption runs to
        its end, and then the first encryption finishes, then none fails, and every segment
        the chunk's outputs name decrypts, at the size they say, to one delivery's cut,
        whole (not one segment of the other's), and the work store keeps that delivery's
        attempt only."""
        spec = new_job_spec(str(copy_clip), asset="film", ladder="copy", segment_seconds=2)
        services.jobs.create(spec)
        packaging.probe_source(services, spec)
        other = replace(spec, source=str(negated_copy_clip))
        work = services.work if store == "local" else RemoteStandIn(services.work)
        stage = replace(services, work=work)
        race = RacingDeliveries()
        race.hold_second_cut(monkeypatch, "segment_chunk", other.source)
        held = HoldsAfterOnePlacedSegment(work, spec.job_id)
        second = race.start(lambda: packaging.segment(stage, other, CHUNK))
        first_encrypt = None
        try:
            assert race.second_cut.wait(HOLD_S)
            packaging.segment(stage, spec, CHUNK)
            first_encrypt = race.start(
                lambda: packaging.encrypt(replace(services, work=held), spec, CHUNK))
            assert held.placed_one.wait(HOLD_S)
            race.second_go.set()
            second.join(HOLD_S)
            assert not second.is_alive()
            packaging.encrypt(stage, spec, CHUNK)
        finally:
            race.second_go.set()
            held.go.set()
            second.join(HOLD_S)
            if first_encrypt is not None:
                first_encrypt.join(HOLD_S)
        assert (race.failures == [] and first_encrypt is not None
                and not first_encrypt.is_alive())
        monkeypatch.undo()

        decrypted = published_chunk(services, spec)
        cuts = [plain_chunk(services, source, segment_seconds=2)
                for source in (copy_clip, negated_copy_clip)]
        # The harness: the two deliveries' bytes differ, segment by segment.
        [first_cut, second_cut] = [cut for [cut] in (c.values() for c in cuts)]
        assert len(first_cut) == len(second_cut) >= 3
        assert not set(first_cut) & set(second_cut)
        assert decrypted in cuts
        # The losing delivery's attempt is discarded: the work store keeps the winner's only.
        winner = layout.chunk_attempt_prefix(spec.job_id, CHUNK,
                                             produced_output(services, spec)["attempt"]) + "/"
        kept = services.work.list(layout.chunk_prefix(spec.job_id, CHUNK) + "/")
        assert kept and all(key.startswith(winner) for key in kept)

    def test_a_delivery_finding_the_chunk_named_cuts_nothing(
        self, services: Services, probed: tuple[JobSpec, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a chunk cut and named once, whose delivery then died before it handed on,
        when its segment stage is delivered again, then it cuts nothing (no ffmpeg runs),
        says how many segments the chunk has, and the chunk's output still names the first
        attempt, whose files are as they were."""
        spec, _ = probed
        written = packaging.segment(services, spec, CHUNK)
        first = produced_output(services, spec)
        files = work_files(services, spec)

        def cut_again(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a redelivery after the chunk was named cut it again")

        monkeypatch.setattr(packaging, "segment_chunk", cut_again)
        assert packaging.segment(services, spec, CHUNK) == written
        assert produced_output(services, spec) == first
        assert work_files(services, spec) == files


class TestOverlappingSegmentAttempts:
    def test_encrypt_reads_the_finished_attempt_while_another_writes(
        self, services: Services, probed: tuple[JobSpec, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a redelivered segment attempt half-way through writing (its first segment
        torn) when an earlier delivery finishes its own, when encrypt runs meanwhile, then
        encrypt reads only the finished attempt: every decrypted segment equals that
        attempt's plain bytes."""
        spec, rendition = probed
        cut = packaging.segment_chunk
        half_written = threading.Event()
        release = threading.Event()

        def torn_attempt(
            source: str, renditions: Any, chunk: Any, out_dir: Path, **options: Any
        ) -> Any:
            if half_written.is_set():  # the finished delivery's: a real cut
                return cut(source, renditions, chunk, out_dir, **options)
            # What a second ffmpeg leaves mid-run: a truncated first segment.
            (out_dir / rendition).mkdir(parents=True, exist_ok=True)
            (out_dir / rendition / "seg_00000.ts").write_bytes(b"G" + bytes(187))
            half_written.set()
            release.wait(timeout=60)
            raise TransientError("the redelivered attempt's worker died")

        def redelivered() -> None:
            with pytest.raises(TransientError):
                packaging.segment(services, spec, CHUNK, seal=False)

        monkeypatch.setattr(packaging, "segment_chunk", torn_attempt)
        second = threading.Thread(target=redelivered)
        second.start()
        try:
            assert half_written.wait(timeout=60)
            # Plain segments, as a transcode leaves them (a remux is sealed: test_sealing.py).
            packaging.segment(services, spec, CHUNK, seal=False)
            packaging.encrypt(services, spec, CHUNK)
        finally:
            release.set()
            second.join(timeout=60)

        produced = produced_output(services, spec)
        finished = layout.chunk_rendition_prefix(
            spec.job_id, CHUNK, produced["attempt"], rendition
        )
        plain = [services.work.get_bytes(f"{finished}/{seg['name']}")
                 for seg in produced["produced"][rendition]["segments"]]
        assert plain[0][:1] == b"G" and len(plain[0]) > 188
        assert _decrypted(services, spec, rendition) == plain


class TestRedeliveredPlaylistStage:
    def test_the_rotation_warning_is_said_once(self, services: Services) -> None:
        """Rotation every 2 segments of a one-segment clip cannot happen: the playlist stage
        says so, and a redelivery of that stage does not say it twice."""
        clip = lavfi_clip("one-keyframe.mp4", seconds=3, gop=1000)
        spec = new_job_spec(str(clip), asset="onekey", ladder="copy", key_rotation_segments=2)
        services.jobs.create(spec)
        packaging.probe_source(services, spec)
        packaging.segment(services, spec, CHUNK, seal=False)
        packaging.encrypt(services, spec, CHUNK)
        packaging.build_playlists(services, spec)
        packaging.build_playlists(services, spec)
        warnings = services.jobs.get(spec.job_id).json_field("warnings")
        assert len(warnings) == 1 and "--key-rotation-segments 2" in warnings[0]


@pytest.fixture
def runtime(services: Services) -> Iterator[Runtime]:
    yield build_runtime(services.settings, services=services)


class TestOneFailurePath:
    def test_a_job_out_of_retries_is_failed_and_its_scratch_discarded(
        self, runtime: Runtime, probed: tuple[JobSpec, str], monkeypatch: pytest.MonkeyPatch,
        copy_clip: Path,
    ) -> None:
        """Given an encrypt stage that fails transiently every time, when dramatiq gives up,
        then the job is failed with the reason and nothing of it is left in work storage."""
        monkeypatch.setattr("workers.actors.MAX_RETRIES", 0)
        runtime = build_runtime(runtime.settings, services=runtime.services)

        def always_down(*args: Any, **kwargs: Any) -> int:
            raise TransientError("the vault is unreachable")

        monkeypatch.setattr(packaging, "encrypt", always_down)
        spec = new_job_spec(str(copy_clip), asset="doomed", ladder="copy")

        record = run_embedded(runtime, spec)

        assert record.status == "failed"
        assert "the vault is unreachable" in (record.error or "")
        assert runtime.services.work.list(layout.job_prefix(spec.job_id)) == []

    def test_a_message_delivered_too_often_fails_its_job_as_poison(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """A stage whose worker keeps dying (deliveries counted by the job record, since a
        SIGKILL tells dramatiq nothing) fails the job as poison instead of running forever."""
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="poison", ladder="copy")
        runtime.services.jobs.create(spec)
        for _ in range(runtime.settings.max_deliveries):
            runtime.services.jobs.stage_started(spec.job_id, "probe")

        ran = flow.run_stage(runtime, spec.job_id, "probe", lambda _: pytest.fail("ran"))

        record = runtime.services.jobs.get(spec.job_id)
        assert ran is None and record.status == "failed" and record.failed_stage == "probe"
        assert "delivered" in (record.error or "") and "resubmit" in (record.error or "")

    def test_each_delivery_is_counted_once_so_the_last_one_allowed_still_runs(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """A stage's start counts its delivery once: the last delivery the bound allows runs."""
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="counted", ladder="copy")
        runtime.services.jobs.create(spec)
        for _ in range(runtime.settings.max_deliveries - 1):
            runtime.services.jobs.stage_started(spec.job_id, "probe")

        ran = flow.run_stage(runtime, spec.job_id, "probe", lambda _: "ran")

        assert ran is not None and ran.result == "ran"
        flow.hand_on(runtime, ran)  # the stage's end, as its after_* writes it

        stage = runtime.services.jobs.get(spec.job_id).stage("probe")
        assert stage is not None and stage.status == "done"
        assert stage.attempts == runtime.settings.max_deliveries


class TestADeliveryAfterTheJobEnded:
    """A delivery still running when its job ends (a chunk failed for good, an operator
    cancelled it, another delivery of the same stage finished the job) stops without failing
    its stage: the record stays as the job's end wrote it, and the delivery leaves nothing of
    its own in the work store."""

    @pytest.mark.parametrize("end", ["failed", "cancelled"])
    def test_a_chunk_cut_after_the_job_ended_is_not_named_and_not_kept(
        self, runtime: Runtime, probed: tuple[JobSpec, str], monkeypatch: pytest.MonkeyPatch,
        end: str,
    ) -> None:
        """Given a chunk's segment stage whose job ends while ffmpeg cuts (another chunk
        failed for good, and its failure discarded the job's work; or an operator cancelled
        it), when the cut is done, then no output names it, its attempt is deleted (nothing
        of the job is left in the work store) and the job's record is as its end wrote it:
        the segment stage is not marked failed."""
        spec, _ = probed
        services = runtime.services
        cut = packaging.segment_chunk

        def job_ends_meanwhile(*args: Any, **kwargs: Any) -> Any:
            produced = cut(*args, **kwargs)
            if end == "failed":
                from workers import flow

                flow.fail(runtime, spec.job_id, "segment:c001", "c001 is not media")
            else:
                assert services.jobs.cancel(spec.job_id)
            return produced

        monkeypatch.setattr(packaging, "segment_chunk", job_ends_meanwhile)

        runtime.broker.get_actor("media.segment")(spec.job_id, CHUNK)

        record = services.jobs.get(spec.job_id)
        assert record.status == end
        assert record.failed_stage == ("segment:c001" if end == "failed" else None)
        stage = record.stage(f"segment:{CHUNK}")
        assert stage is not None and stage.status != "failed" and stage.error is None
        assert services.jobs.outputs(spec.job_id) == {}
        assert services.work.list(layout.job_prefix(spec.job_id)) == []

    def test_an_audio_group_delivery_after_the_job_succeeded_marks_nothing_failed(
        self, runtime: Runtime, two_audio_clip: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given two deliveries of an audio group at once, the first of which claims, places
        its group and sees the job through to its success (whose end discards the job's
        work), when the second's cut is done, then the job is still succeeded with no error,
        the audio stage is not marked failed, and the second left nothing in the work store
        (its attempt deleted, nothing placed)."""
        services = runtime.services
        spec = audio_group_job(services, two_audio_clip, "ts")
        cut = packaging.segment_audio_renditions
        first_done = threading.Event()

        def first_finishes_the_job_meanwhile(*args: Any, **kwargs: Any) -> Any:
            produced = cut(*args, **kwargs)
            if not first_done.is_set():
                first_done.set()
                packaging.audio_group(services, spec, services.jobs.get(spec.job_id))
                assert services.jobs.succeed(spec.job_id, {"asset": spec.asset})
                discard_work(services, spec.job_id)  # as the job's last stage does
            return produced

        monkeypatch.setattr(packaging, "segment_audio_renditions",
                            first_finishes_the_job_meanwhile)

        runtime.broker.get_actor("media.audio")(spec.job_id)

        record = services.jobs.get(spec.job_id)
        assert first_done.is_set()
        assert (record.status, record.error, record.failed_stage) == ("succeeded", None, None)
        stage = record.stage("audio")
        assert stage is not None and stage.status != "failed" and stage.error is None
        assert services.work.list(layout.job_prefix(spec.job_id)) == []


    def test_an_audio_group_placed_as_the_job_finished_is_not_left_placed(
        self, runtime: Runtime, two_audio_clip: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a delivery of the audio group that finds it named (an earlier delivery cut
        and claimed it) and places it while the job ends (that delivery saw it through to its
        success, whose end discarded the job's work), when its placing is done, then the
        job is still succeeded, the audio stage is not marked failed, and none of the files
        it placed is left where encrypt's output goes."""
        from workers import flow

        services = runtime.services
        spec = audio_group_job(services, two_audio_clip, "ts")
        # As the probe's hand-on plans it: the group is a member of the chunks' fan-in.
        services.jobs.set_json_fields(spec.job_id, {flow.AUDIO_BESIDE: True})
        packaging.audio_group(services, spec, services.jobs.get(spec.job_id))
        services.work.delete_prefix(layout.encrypted_prefix(spec.job_id, "") + "/")
        place = packaging._place_encrypted

        def job_finishes_meanwhile(*args: Any, **kwargs: Any) -> Any:
            placed = place(*args, **kwargs)
            assert services.work.list(layout.encrypted_prefix(spec.job_id, ""))
            assert services.jobs.succeed(spec.job_id, {"asset": spec.asset})
            return placed

        monkeypatch.setattr(packaging, "_place_encrypted", job_finishes_meanwhile)

        runtime.broker.get_actor("media.audio")(spec.job_id)

        record = services.jobs.get(spec.job_id)
        assert (record.status, record.error, record.failed_stage) == ("succeeded", None, None)
        stage = record.stage("audio")
        assert stage is not None and stage.status != "failed" and stage.error is None
        assert services.work.list(layout.encrypted_prefix(spec.job_id, "")) == []


def _damaged(services: Services, spec: JobSpec, rendition: str, damage: str) -> str:
    """Damage ``spec``'s probed job one way (a field of its plan, or an output a stage left),
    after running the stages before the one that reads it; that stage's name."""
    jobs = services.jobs
    produced = layout.produced_output(CHUNK)
    if damage in ("chunks-a-number", "renditions-a-number"):
        jobs.set_json_fields(spec.job_id, {damage.removesuffix("-a-number"): 5})
        return f"segment:{CHUNK}"
    if damage == "audio-bitrates-text":
        jobs.set_json_fields(spec.job_id, {"audio_bitrates": ["128k"]})
        return "audio"
    if damage == "chunks-not-json":
        jobs.backend.write(spec.job_id, {"chunks": "[{"})
        return f"segment:{CHUNK}"
    packaging.segment(services, spec, CHUNK)
    if damage == "produced-not-json":
        jobs.backend.write_outputs(spec.job_id, {produced: "{not json"})
        return f"encrypt:{CHUNK}"
    record = produced_output(services, spec)
    if damage == "produced-a-number":
        jobs.set_output(spec.job_id, produced, {**record, "produced": 5})
        return f"encrypt:{CHUNK}"
    if damage == "attempt-a-number":
        jobs.set_output(spec.job_id, produced, {**record, "attempt": 5})
        return f"encrypt:{CHUNK}"
    if damage == "sealed-sizes-empty":
        jobs.set_output(spec.job_id, produced, {**record, "sealed": {rendition: []}})
        return f"encrypt:{CHUNK}"
    assert damage == "sizes-text"
    packaging.encrypt(services, spec, CHUNK)
    jobs.set_output(spec.job_id, layout.sizes_output(CHUNK), {rendition: "big"})
    return "playlist"


class TestADamagedPlanOrOutput:
    @pytest.mark.parametrize("damage, record", [
        ("chunks-a-number", "Chunk"),
        ("renditions-a-number", "Rendition"),
        ("audio-bitrates-text", "JobPlan"),
        ("chunks-not-json", "JobRecord"),
        ("produced-not-json", "JobRecord"),
        ("produced-a-number", "ChunkAttempt"),
        ("attempt-a-number", "ChunkAttempt"),
        ("sealed-sizes-empty", "ChunkAttempt"),
        ("sizes-text", "ChunkSizes"),
    ])
    def test_fails_the_stage_reading_it_at_once_saying_to_resubmit(
        self, runtime: Runtime, probed: tuple[JobSpec, str], damage: str, record: str
    ) -> None:
        """Given a job whose plan, or an output a stage left, is damaged (a value no version
        writes), when the stage that reads it is delivered once, then the job fails there at
        once (not retried as a TypeError), its reason naming the record and saying to
        resubmit the job."""
        spec, rendition = probed
        stage = _damaged(runtime.services, spec, rendition, damage)
        name, _, chunk = stage.partition(":")

        runtime.broker.get_actor(f"media.{name}")(spec.job_id, *((chunk,) if chunk else ()))

        failed = runtime.services.jobs.get(spec.job_id)
        assert (failed.status, failed.failed_stage) == ("failed", stage)
        assert f"the job's {record} record is unreadable" in (failed.error or "")
        assert "resubmit the job" in (failed.error or "")


class TestAudioRelease:
    def test_a_released_chunk_is_sent_unless_its_segment_stage_has_started(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """A chunk whose audio is released (by the first delivery of the audio stage or by a
        redelivery) is sent unless its segment stage has started: one whose segment stage
        finished, or is running (the broker redelivers that one itself), is not sent; one
        still queued (an earlier delivery may have died between release and send) is sent
        again."""
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="released")
        jobs = runtime.services.jobs
        jobs.create(spec)
        jobs.stage_finished(spec.job_id, flow.chunk_stage("segment", "c000"))
        jobs.begin_stage(spec.job_id, flow.chunk_stage("segment", "c003"))
        queue = runtime.broker.queues["segment"]  # type: ignore[attr-defined]
        before = queue.qsize()

        flow.audio_released(runtime, spec.job_id, "c000")
        flow.audio_released(runtime, spec.job_id, "c003")
        assert queue.qsize() == before
        flow.audio_released(runtime, spec.job_id, "c001")
        flow.audio_released(runtime, spec.job_id, "c001")  # still queued: sent again
        flow.audio_released(runtime, spec.job_id, "c002")
        assert queue.qsize() == before + 3
        record = jobs.get(spec.job_id)
        for chunk in ("c001", "c002"):
            state = record.stage(flow.chunk_stage("segment", chunk))
            assert state is not None and state.status == "queued"

    def test_an_audio_group_is_cut_beside_the_chunks_and_joins_their_fan_in(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """Separate audio renditions of a chunked job: the chunks are sent at once with the
        audio stage (they do not need it), and the playlist waits for both the last chunk
        and the audio group, whichever ends last, however often either arrives."""
        from pipeline.plan import AudioRendition, plan_chunks
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="grouped")
        runtime.services.jobs.create(spec)
        chunks = tuple(plan_chunks(8.0, 2.0, 4, copy=False))
        group = AudioRendition(name="audio-en", track=0, copy=False, kbps=128, language="en",
                               title="English", default=True, channels=2)
        plan = packaging.JobPlan(renditions=(), chunks=chunks, audio_bitrates=(),
                                 audio_renditions=(group,))
        queues = runtime.broker.queues  # type: ignore[attr-defined]
        sizes = {name: queues[name].qsize() for name in ("segment", "publish")}

        flow.after_probe(runtime, flow.Ran("probe", runtime.services.jobs.get(spec.job_id),
                                           plan))
        assert queues["segment"].qsize() == sizes["segment"] + len(chunks) + 1  # chunks, audio

        def ran(stage: str) -> flow.Ran[None]:
            return flow.Ran(stage, runtime.services.jobs.get(spec.job_id), None)

        for chunk in chunks:
            flow.after_encrypt(runtime, ran(f"encrypt:{chunk.name}"), chunk.name)
        flow.after_encrypt(runtime, ran(f"encrypt:{chunks[0].name}"), chunks[0].name)  # again
        assert queues["publish"].qsize() == sizes["publish"]
        flow.after_audio(runtime, ran("audio"))
        assert queues["publish"].qsize() == sizes["publish"] + 1
        playlist = runtime.services.jobs.get(spec.job_id).stage("playlist")
        assert playlist is not None and playlist.status == "queued"

    def test_a_redelivered_audio_group_that_arrived_does_nothing_again(
        self, tmp_path: Path, two_audio_clip: Path
    ) -> None:
        """Given a chunked transcode whose audio group (two languages) was cut, encrypted and
        arrived at the fan-in, when its audio message is delivered again, then it cuts
        nothing (every work file as it was, the renditions it named unchanged), counts
        nothing at the fan-in and sends nothing, and its stage is done."""
        from workers import flow

        services = build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data"),
                                                 "HLSVAULT_CHUNK_SECONDS": "2"}))
        runtime = build_runtime(services.settings, services=services)
        spec = new_job_spec(str(two_audio_clip), asset="langs", segment_seconds=1.0)
        services.jobs.create(spec, queued=("probe",))
        runtime.broker.get_actor(flow.PROBE).fn(spec.job_id)
        audio = runtime.broker.get_actor(flow.AUDIO)
        audio.fn(spec.job_id)
        record = services.jobs.get(spec.job_id)
        assert record.arrived(flow.FAN_IN, flow.AUDIO_MEMBER)
        chunks = len(record.json_field("chunk_names"))
        assert chunks == 3 and record.fields["pending.encrypt"] == str(chunks)
        queues = runtime.broker.queues  # type: ignore[attr-defined]
        sent = {name: queues[name].qsize() for name in ("segment", "publish")}
        before = work_files(services, spec)

        audio.fn(spec.job_id)

        assert work_files(services, spec) == before
        record = services.jobs.get(spec.job_id)
        assert record.fields["pending.encrypt"] == str(chunks)
        assert {name: queues[name].qsize() for name in sent} == sent
        stage = record.stage("audio")
        assert stage is not None and (stage.status, stage.attempts) == ("done", 2)

    def test_a_redelivered_audio_group_sends_the_playlist_only_if_it_may_be_lost(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """An audio group that arrived last queued the playlist: a redelivery sends it again
        while it is still queued (that arrival may have died before its send), and not once
        it has started, whose status it leaves as it is."""
        from pipeline.plan import AudioRendition, plan_chunks
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="lastarrival")
        jobs = runtime.services.jobs
        jobs.create(spec)
        chunks = tuple(plan_chunks(4.0, 2.0, 2, copy=False))
        group = AudioRendition(name="audio-en", track=0, copy=False, kbps=128, language="en",
                               title="English", default=True, channels=2)
        plan = packaging.JobPlan(renditions=(), chunks=chunks, audio_bitrates=(),
                                 audio_renditions=(group,))
        flow.after_probe(runtime, flow.Ran("probe", jobs.get(spec.job_id), plan))

        def ran(stage: str) -> flow.Ran[None]:
            return flow.Ran(stage, jobs.get(spec.job_id), None)

        for chunk in chunks:
            flow.after_encrypt(runtime, ran(f"encrypt:{chunk.name}"), chunk.name)
        publish = runtime.broker.queues["publish"]  # type: ignore[attr-defined]
        before = publish.qsize()
        flow.after_audio(runtime, ran("audio"))
        assert publish.qsize() == before + 1

        flow.after_audio(runtime, ran("audio"))  # the playlist still queued
        assert publish.qsize() == before + 2
        jobs.begin_stage(spec.job_id, "playlist")
        flow.after_audio(runtime, ran("audio"))
        assert publish.qsize() == before + 2
        playlist = jobs.get(spec.job_id).stage("playlist")
        assert playlist is not None and playlist.status == "running"
        assert jobs.get(spec.job_id).fields["pending.encrypt"] == "0"

    def test_an_audio_group_planned_by_an_older_version_sends_the_chunks_after_it(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """A job planned before audio groups ran beside the chunks (no mark; its fan-in counts
        the chunks only): when its audio stage ends, the chunks are sent, as they were then."""
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="older")
        jobs = runtime.services.jobs
        jobs.create(spec)
        jobs.stage_queued(spec.job_id, json_fields={"chunk_names": ["c000", "c001"],
                                                    "audio_bitrates": []})
        queue = runtime.broker.queues["segment"]  # type: ignore[attr-defined]
        before = queue.qsize()
        flow.after_audio(runtime, flow.Ran("audio", jobs.get(spec.job_id), None))
        assert queue.qsize() == before + 2


class EveryMessageTwice(StubBroker):
    """A broker that delivers nothing by itself: :meth:`run` calls each message's actor twice
    in a row, as a worker that died before its ack would have it redelivered. What the second
    delivery sends again is already queued and dropped, as the queue would hold it once."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: deque[Message[Any]] = deque()
        self.seen: set[tuple[str, tuple[Any, ...]]] = set()
        self.delivered: list[str] = []

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        key = (message.actor_name, tuple(message.args))
        if key not in self.seen:
            self.seen.add(key)
            self.sent.append(message)
        return message

    def run(self) -> None:
        while self.sent:
            message = self.sent.popleft()
            for _ in range(2):
                self.delivered.append(message.actor_name)
                self.get_actor(message.actor_name).fn(*message.args, **message.kwargs)


class TestEveryStageRedelivered:
    def test_the_job_publishes_once_with_every_stage_done_and_counted_twice(
        self, services: Services, copy_clip: Path
    ) -> None:
        """Given every stage delivered a second time right after it ran (its end and the next
        stage's queued mark written in one step, the fan-in's in the arrival), the job
        succeeds, each stage is done with two deliveries counted (the last one's second
        delivery finds the job ended and counts nothing), the fan-in sent the playlist once,
        and the published version's segments decrypt to the chunk's bytes."""
        broker = EveryMessageTwice()
        runtime = build_runtime(services.settings, services=services, broker=broker)
        spec = new_job_spec(str(copy_clip), asset="twice", ladder="copy")

        runtime.enqueue(spec)
        broker.run()

        record = services.jobs.get(spec.job_id)
        assert record.status == "succeeded", record.error
        stages = {s.name: (s.status, s.attempts) for s in record.stages}
        assert stages == {
            "probe": ("done", 2), "segment:c000": ("done", 2), "encrypt:c000": ("done", 2),
            "playlist": ("done", 2), "upload": ("done", 2), "invalidate": ("skipped", 1),
        }
        assert broker.delivered.count("media.playlist") == 2  # one message, twice
        assert services.jobs.outputs(spec.job_id) == {}  # dropped with the work files
        assert services.catalog.current_version(spec.asset) == spec.version
        described = services.catalog.get_version(spec.asset, spec.version)
        key = services.keys.get(spec.asset, spec.version, 0)
        for rendition in described.renditions:
            for seg in rendition.segments:
                data = services.origin.get_bytes(
                    layout.segment_key(spec.asset, spec.version, rendition.name, seg.name))
                assert decrypt_bytes(data, key, iv_for_sequence(seg.sequence))[:1] == b"G"


class InOrder(StubBroker):
    """A broker that delivers nothing by itself: :meth:`deliver` runs the oldest message's
    actor, as one worker taking one message at a time would."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: deque[Message[Any]] = deque()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        self.waiting.append(message)
        return message

    def deliver(self, message: Message[Any] | None = None) -> Message[Any]:
        """Run the oldest waiting message, or deliver ``message`` (again)."""
        if message is None:
            message = self.waiting.popleft()
        self.get_actor(message.actor_name).fn(*message.args, **message.kwargs)
        return message

    def names(self) -> list[str]:
        return [message.actor_name for message in self.waiting]


class TestRedeliveredAfterTheNextStageStarted:
    @pytest.mark.parametrize("playlist", ["running", "done"])
    def test_a_chunk_redelivered_after_the_fan_in_changes_nothing(
        self, tmp_path: Path, copy_clip: Path, monkeypatch: pytest.MonkeyPatch, playlist: str
    ) -> None:
        """Given a chunked transcode whose last chunk's encryption completed the fan-in,
        when that chunk's encrypt and segment messages are delivered again while the
        playlist stage runs (or once it has finished), then no message is sent, the
        playlist's status stays as it was and no work file or output changes; the job then
        publishes, its playlist having run once, segments byte for byte those encrypted
        before the redeliveries."""
        from workers import flow

        services = build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data"),
                                                 "HLSVAULT_CHUNK_SECONDS": "2"}))
        broker = InOrder()
        runtime = build_runtime(services.settings, services=services, broker=broker)
        spec = new_job_spec(str(copy_clip), asset="again", segment_seconds=1.0)
        runtime.enqueue(spec)
        delivered: dict[str, list[Message[Any]]] = {flow.SEGMENT: [], flow.ENCRYPT: []}
        while broker.names()[:1] != [flow.PLAYLIST]:
            message = broker.deliver()
            delivered.get(message.actor_name, []).append(message)
        encrypted = delivered[flow.ENCRYPT]
        assert len(encrypted) == 3  # three chunks: the last one completed the fan-in
        chunk = encrypted[-1].args[1]
        [segmented] = [m for m in delivered[flow.SEGMENT] if m.args[1] == chunk]
        jobs = services.jobs
        seen: dict[str, Any] = {}

        def redeliver() -> None:
            before = work_files(services, spec), jobs.outputs(spec.job_id)
            broker.deliver(encrypted[-1])
            broker.deliver(segmented)
            seen["unchanged"] = (work_files(services, spec), jobs.outputs(spec.job_id)) == before
            seen["sent"] = broker.names()
            state = jobs.get(spec.job_id).stage("playlist")
            seen["playlist"] = state.status if state is not None else None
            seen["encrypted"] = before[0]

        if playlist == "running":
            build_playlists = packaging.build_playlists

            def redelivered_meanwhile(*args: Any, **kwargs: Any) -> Any:
                redeliver()
                return build_playlists(*args, **kwargs)

            monkeypatch.setattr(packaging, "build_playlists", redelivered_meanwhile)
            broker.deliver()
            assert seen["sent"] == []  # (the playlist's own hand-on came after)
        else:
            broker.deliver()
            described = services.catalog.get_version(spec.asset, spec.version)
            redeliver()
            assert seen["sent"] == [flow.UPLOAD]
            assert services.catalog.get_version(spec.asset, spec.version) == described
        assert seen["playlist"] == playlist
        assert seen["unchanged"]
        record = jobs.get(spec.job_id)
        for name in ("encrypt", "segment"):
            stage = record.stage(flow.chunk_stage(name, chunk))
            assert stage is not None and (stage.status, stage.attempts) == ("done", 2)

        while broker.waiting:
            broker.deliver()

        record = jobs.get(spec.job_id)
        assert record.status == "succeeded", record.error
        state = record.stage("playlist")
        assert state is not None and (state.status, state.attempts) == ("done", 1)
        described = services.catalog.get_version(spec.asset, spec.version)
        root = layout.job_prefix(spec.job_id) + "/"
        segments = 0
        for rendition in described.renditions:
            for seg in rendition.segments:
                published = services.origin.get_bytes(
                    layout.segment_key(spec.asset, spec.version, rendition.name, seg.name))
                encrypted_key = layout.encrypted_key(spec.job_id, rendition.name, seg.name)
                assert published == seen["encrypted"][encrypted_key.removeprefix(root)][1]
                segments += 1
        assert segments >= 6

    @pytest.mark.parametrize("stage, successor", [
        ("playlist", "download"), ("download", "trickplay"), ("trickplay", "upload"),
        ("upload", "invalidate"), ("rekey", "upload"),
    ])
    def test_a_stage_redelivered_while_its_successor_runs_makes_nothing_again(
        self, tmp_path: Path, copy_clip: Path, monkeypatch: pytest.MonkeyPatch, stage: str,
        successor: str,
    ) -> None:
        """Given a job with a download and trick play whose ``stage`` finished and handed on,
        when its message is delivered again while the stage after it runs (reading what it
        made), then no file of the work store, the origin or the vault is written (bytes,
        inode, mtime), nothing is sent and the stage is done with two deliveries; the job
        then publishes, the successor having run once. A rekey of the published job, before
        its upload, the same."""
        from pipeline import cdn, downloads, lifecycle, publish, trickplay

        services = build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")}))
        broker = InOrder()
        runtime = build_runtime(services.settings, services=services, broker=broker)
        spec = new_job_spec(str(copy_clip), asset="handedon", ladder="copy",
                            download=layout.DOWNLOAD_TOP, trick_play=True)
        runtime.enqueue(spec)
        if stage == "rekey":
            while broker.waiting:
                broker.deliver()
            spec = lifecycle.new_rekey_spec(services, spec.asset)
            runtime.enqueue(spec)
        ran: dict[str, Message[Any]] = {}
        while broker.names()[:1] != [f"media.{successor}"]:
            message = broker.deliver()
            ran[message.actor_name] = message
        redelivered = ran[f"media.{stage}"]
        jobs = services.jobs
        seen: dict[str, Any] = {}

        def redeliver() -> None:
            before = stored_files(services)
            broker.deliver(redelivered)
            seen["unchanged"] = stored_files(services) == before
            seen["sent"] = broker.names()

        module, name = {
            "download": (downloads, "make_download"), "trickplay": (trickplay, "make_trick_play"),
            "upload": (publish, "upload"), "invalidate": (cdn, "invalidate"),
        }[successor]
        work = getattr(module, name)

        def redelivered_meanwhile(*args: Any, **kwargs: Any) -> Any:
            redeliver()
            return work(*args, **kwargs)

        monkeypatch.setattr(module, name, redelivered_meanwhile)
        broker.deliver()

        assert seen["unchanged"]
        assert seen["sent"] == []  # (the successor's own hand-on came after)
        state = jobs.get(spec.job_id).stage(stage)
        assert state is not None and (state.status, state.attempts) == ("done", 2)
        while broker.waiting:
            broker.deliver()
        record = jobs.get(spec.job_id)
        assert record.status == "succeeded", record.error
        state = record.stage(successor)
        assert state is not None and state.attempts == 1
        assert services.catalog.current_version(spec.asset) == spec.version

    def test_a_segment_redelivered_after_its_encryption_started_sends_it_no_more(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """A chunk's segment stage delivered again while its encryption is still queued sends
        that message again (the earlier delivery may have died before its send), and leaves
        its status queued; once the encryption has started, a redelivery sends nothing and
        leaves it running."""
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="segagain")
        jobs = runtime.services.jobs
        jobs.create(spec, queued=("segment:c001",))
        queue = runtime.broker.queues["encrypt"]  # type: ignore[attr-defined]
        before = queue.qsize()

        def deliver_segment() -> None:
            _, record = jobs.begin_stage(spec.job_id, "segment:c001")
            flow.after_segment(runtime, flow.Ran("segment:c001", record, None), "c001")

        deliver_segment()
        assert queue.qsize() == before + 1
        deliver_segment()  # the encryption still queued
        assert queue.qsize() == before + 2
        state = jobs.get(spec.job_id).stage("encrypt:c001")
        assert state is not None and state.status == "queued"
        jobs.begin_stage(spec.job_id, "encrypt:c001")
        deliver_segment()
        assert queue.qsize() == before + 2
        record = jobs.get(spec.job_id)
        state = record.stage("encrypt:c001")
        assert state is not None and state.status == "running"
        segment = record.stage("segment:c001")
        assert segment is not None and (segment.status, segment.attempts) == ("done", 3)

    def test_a_probe_redelivered_after_a_chunk_arrived_keeps_the_fan_in_count(
        self, runtime: Runtime, copy_clip: Path
    ) -> None:
        """Given a job of three chunks whose first chunk was encrypted and arrived at the
        fan-in, when the probe is delivered again, then the chunks that started are not sent
        again (the one still queued is), and the fan-in still counts the first chunk: the
        other two arriving send the playlist."""
        from pipeline.plan import plan_chunks
        from workers import flow

        spec = new_job_spec(str(copy_clip), asset="probeagain")
        jobs = runtime.services.jobs
        jobs.create(spec, queued=("probe",))
        chunks = tuple(plan_chunks(6.0, 2.0, 2, copy=False))
        plan = packaging.JobPlan(renditions=(), chunks=chunks, audio_bitrates=())
        queues = runtime.broker.queues  # type: ignore[attr-defined]
        before = {name: queues[name].qsize() for name in ("segment", "publish")}

        def deliver_probe() -> None:
            _, record = jobs.begin_stage(spec.job_id, "probe")
            flow.after_probe(runtime, flow.Ran("probe", record, plan))

        def ran(stage: str) -> flow.Ran[None]:
            _, record = jobs.begin_stage(spec.job_id, stage)
            return flow.Ran(stage, record, None)

        deliver_probe()
        assert queues["segment"].qsize() == before["segment"] + 3
        flow.after_segment(runtime, ran("segment:c000"), "c000")
        flow.after_encrypt(runtime, ran("encrypt:c000"), "c000")
        jobs.begin_stage(spec.job_id, "segment:c001")

        deliver_probe()

        assert queues["segment"].qsize() == before["segment"] + 4  # c002 again
        record = jobs.get(spec.job_id)
        assert record.fields["pending.encrypt"] == "2"
        statuses = {name: record.stage(f"segment:{name}").status  # type: ignore[union-attr]
                    for name in ("c000", "c001", "c002")}
        assert statuses == {"c000": "done", "c001": "running", "c002": "queued"}
        for name in ("c001", "c002"):
            flow.after_encrypt(runtime, ran(f"encrypt:{name}"), name)
        assert queues["publish"].qsize() == before["publish"] + 1


@pytest.fixture(params=["file", "redis"])
def held(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Runtime, InOrder]:
    """A runtime over either job-record backend whose broker holds every message sent."""
    from pipeline.jobs.redis import RedisRecordBackend

    settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")})
    backend = None
    if request.param == "redis":
        backend = RedisRecordBackend.from_url(request.getfixturevalue("redis_server").url)
    services = build_services(settings, job_backend=backend)
    broker = InOrder()
    return build_runtime(settings, services=services, broker=broker), broker


class TestTwoDeliveriesOfAQueuedStage:
    """A stage still queued may get a second message (a redelivered stage before it re-sends
    it), and the two deliveries may run at once: whichever hands on last, a first delivery
    included, leaves a stage after it that has started as it is and sends it nothing."""

    def test_a_first_delivery_finishing_after_the_next_stage_started_sends_nothing(
        self, held: tuple[Runtime, InOrder]
    ) -> None:
        """Given two deliveries of a chunk's segment stage running at once (the first
        message, and the one a redelivered probe sent), when the second one hands on, its
        encryption starts, and then the first one hands on, then the encryption was sent once
        and stays running."""
        from workers import flow

        runtime, broker = held
        jobs = runtime.services.jobs
        spec = new_job_spec("/videos/film.mp4", asset="twice")
        stage = flow.chunk_stage("segment", "c000")
        jobs.create(spec, queued=(stage,))
        first = flow.Ran(stage, jobs.begin_stage(spec.job_id, stage)[1], None)
        second = flow.Ran(stage, jobs.begin_stage(spec.job_id, stage)[1], None)
        assert (first.record.stage(stage).attempts,  # type: ignore[union-attr]
                second.record.stage(stage).attempts) == (1, 2)  # type: ignore[union-attr]

        flow.after_segment(runtime, second, "c000")
        assert broker.names() == [flow.ENCRYPT]
        jobs.begin_stage(spec.job_id, flow.chunk_stage("encrypt", "c000"))
        flow.after_segment(runtime, first, "c000")

        assert broker.names() == [flow.ENCRYPT]
        record = jobs.get(spec.job_id)
        state = record.stage(flow.chunk_stage("encrypt", "c000"))
        assert state is not None and (state.status, state.attempts) == ("running", 1)
        segment = record.stage(stage)
        assert segment is not None and segment.status == "done"

    def test_the_stage_after_the_playlist_is_sent_once_when_the_fan_in_races(
        self, held: tuple[Runtime, InOrder]
    ) -> None:
        """Given a fan-in of two chunks, the first arrived, and two deliveries of the last
        chunk's encryption running at once: when one arrives (completing the fan-in: the
        playlist is sent) and the other then arrives too (the playlist still queued: sent
        again), and the two playlist deliveries run at once, the second to start handing on
        first and the upload starting before the first hands on, then the upload was sent
        once and stays running."""
        from pipeline.jobs import pending_field
        from workers import flow

        runtime, broker = held
        jobs = runtime.services.jobs
        spec = new_job_spec("/videos/film.mp4", asset="fanrace")
        jobs.create(spec)
        jobs.set_json_fields(spec.job_id, {pending_field(flow.FAN_IN): 2})

        def ran(stage: str) -> flow.Ran[None]:
            return flow.Ran(stage, jobs.begin_stage(spec.job_id, stage)[1], None)

        flow.after_encrypt(runtime, ran("encrypt:c000"), "c000")
        completing, redelivered = ran("encrypt:c001"), ran("encrypt:c001")
        flow.after_encrypt(runtime, completing, "c001")
        flow.after_encrypt(runtime, redelivered, "c001")
        assert broker.names() == [flow.PLAYLIST, flow.PLAYLIST]

        late, early = ran("playlist"), ran("playlist")
        flow.after_playlist(runtime, early)
        assert broker.names() == [flow.PLAYLIST, flow.PLAYLIST, flow.UPLOAD]
        jobs.begin_stage(spec.job_id, "upload")
        flow.after_playlist(runtime, late)

        assert broker.names() == [flow.PLAYLIST, flow.PLAYLIST, flow.UPLOAD]
        record = jobs.get(spec.job_id)
        upload = record.stage("upload")
        assert upload is not None and (upload.status, upload.attempts) == ("running", 1)
        playlist = record.stage("playlist")
        assert playlist is not None and (playlist.status, playlist.attempts) == ("done", 2)
