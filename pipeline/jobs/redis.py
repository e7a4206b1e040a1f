"""Job records as Redis hashes, for the distributed fleet.

    hlsvault:job:<id>              the record (a hash), expiring RECORD_TTL_S after it is
                                   created, and again RECORD_TTL_S after it finishes
    hlsvault:joboutputs:<id>       the job's outputs (a hash), expiring with the record, deleted
                                   when the job ends
    hlsvault:jobs                  sorted set: every job id by creation time
    hlsvault:jobs:status:<status>  sorted set per status: queued and running jobs by creation
                                   time, succeeded, failed and cancelled ones by finish time

A job leaves one status set and joins the next in the Lua script that writes its status, so
the sets always agree with the records, and counts and time ranges read only the sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from ..redisconn import connect, transient_redis_errors
from . import STATUSES, TERMINAL, UnknownJob

#: Finished job records are kept this long for the dashboard and `hlsvault status`.
RECORD_TTL_S = 30 * 24 * 3600
_PREFIX = "hlsvault:job:"
_OUTPUTS = "hlsvault:joboutputs:"
_INDEX = "hlsvault:jobs"
_STATUS_INDEX = "hlsvault:jobs:status:"
#: The status sets, in the order the Lua scripts below number them (KEYS[2] onwards).
_STATUS_KEYS = [_STATUS_INDEX + status for status in STATUSES]
#: Set once the records written before the status sets existed have been placed in them.
_INDEXED_MARKER = "hlsvault:jobs:status:complete"
#: Records placed per round trip when doing so.
_BACKFILL_BATCH = 500

# pipeline.jobs.unstarted in Lua: set each status field ARGV[first..] of the record that is
# absent or queued to queued; returns those set. Scripts that mark stages queued begin with it.
_QUEUE_UNSTARTED = """
local function queue_unstarted(key, first)
  local marked = {}
  for i = first, #ARGV do
    local status = redis.call('HGET', key, ARGV[i])
    if not status or status == 'queued' then
      redis.call('HSET', key, ARGV[i], 'queued')
      marked[#marked + 1] = ARGV[i]
    end
  end
  return marked
end
"""

# A hop: write the fields, then those of the write-once fields the record lacks (HSETNX),
# then queue the unstarted stages, in one round trip. ARGV: how many items the fields take
# (n), those field, value items, how many the write-once ones take (m), theirs, then the
# status fields to queue.
_WRITE_AND_QUEUE = _QUEUE_UNSTARTED + """
local n = tonumber(ARGV[1])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + n))
end
local m = tonumber(ARGV[2 + n])
for i = 3 + n, 2 + n + m, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
return queue_unstarted(KEYS[1], 3 + n + m)
"""

# Write the arriving member's own fields; HSETNX the marker, and only a first arrival
# decrements. Once none is pending, the stages after the fan-in that have not started are
# marked queued (by the last arrival, or a redelivery after it while they are still queued).
# Every caller learns the count left, whether it counted, and the stages it marked. ARGV: the
# counter, the marker, how many items the member's fields take (n), those field, value items,
# then the status fields of the stages after the fan-in.
_ARRIVE = _QUEUE_UNSTARTED + """
local n = tonumber(ARGV[3])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + n))
end
local counted = redis.call('HSETNX', KEYS[1], ARGV[2], '1')
local left
if counted == 1 then
  left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
else
  left = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
end
if left == 0 then
  return {left, counted, queue_unstarted(KEYS[1], 4 + n)}
end
return {left, counted, {}}
"""


# Write a job's outputs and keep them as long as a record: one round trip. KEYS: the outputs
# hash; ARGV: the TTL, then field, value, field, value…
_WRITE_OUTPUTS = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


def _mapping(fields: dict[str, str]) -> dict[Any, Any]:
    # redis-py types hset's mapping over every encodable key type; a str dict is one of them.
    return dict(fields)


# Write the fields only while the job's status is not terminal: a cancelled job stays cancelled.
# A status change moves the job between the status sets in the same step; a job that finishes
# is kept RECORD_TTL_S from then. KEYS: the record, then the status sets in STATUSES order;
# ARGV: job id, record TTL, then field, value, field, value…
_STATUS_TABLES = (
    f"local slot = {{{', '.join(f'{s} = {i}' for i, s in enumerate(STATUSES, start=2))}}}\n"
    f"local ended = {{{', '.join(f'{s} = true' for s in TERMINAL)}}}\n"
)
_WRITE_UNLESS_ENDED = _STATUS_TABLES + """
local old = redis.call('HGET', KEYS[1], 'status')
if not old or ended[old] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
local new = redis.call('HGET', KEYS[1], 'status')
if new ~= old then
  if slot[old] then
    redis.call('ZREM', KEYS[slot[old]], ARGV[1])
  end
  if ended[new] then
    local at = redis.call('HGET', KEYS[1], 'finished_at') or redis.call('TIME')[1]
    redis.call('ZADD', KEYS[slot[new]], at, ARGV[1])
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  elseif slot[new] then
    redis.call('ZADD', KEYS[slot[new]], redis.call('HGET', KEYS[1], 'created_at') or 0, ARGV[1])
  end
end
return 1
"""


# Write one output unless the job has it, keep the outputs as long as a record, and return
# the output that stands: one round trip. A job that has ended (or whose record is gone) gets
# no claim, and nil is returned: its outputs were dropped. KEYS: the outputs hash, the record;
# ARGV: the TTL, field, value.
_CLAIM_OUTPUT = _STATUS_TABLES + """
local status = redis.call('HGET', KEYS[2], 'status')
if not status or ended[status] then
  return false
end
redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGET', KEYS[1], ARGV[2])
"""


# A stage starts: count the delivery, write the stage's fields, mark the job running (moving
# it between the status sets), and read the record, in one round trip. A job that ended is
# only read (count 0); one that does not exist reads empty. KEYS: the record, then the status
# sets; ARGV: job id, the delivery counter's field, then field, value, field, value…
_START_STAGE = _STATUS_TABLES + """
local old = redis.call('HGET', KEYS[1], 'status')
if not old then
  return {0, {}}
end
if ended[old] then
  return {0, redis.call('HGETALL', KEYS[1])}
end
local attempts = redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if old ~= 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  if slot[old] then
    redis.call('ZREM', KEYS[slot[old]], ARGV[1])
  end
  redis.call('ZADD', KEYS[slot['running']], redis.call('HGET', KEYS[1], 'created_at') or 0, ARGV[1])
end
return {attempts, redis.call('HGETALL', KEYS[1])}
"""


# Place a job written before the status sets existed in the set of its status, unless a status
# write placed it already: atomic with _WRITE_UNLESS_ENDED, so that the two never leave a job in
# two sets. KEYS: the record, then the status sets; ARGV: the job id.
_PLACE_EXISTING = _STATUS_TABLES + """
for k = 2, #KEYS do
  if redis.call('ZSCORE', KEYS[k], ARGV[1]) then
    return 0
  end
end
local found = redis.call('HMGET', KEYS[1], 'status', 'created_at', 'finished_at')
if not found[1] or not slot[found[1]] then
  return 0
end
local at = found[2] or 0
if ended[found[1]] then
  at = found[3] or at
end
redis.call('ZADD', KEYS[slot[found[1]]], at, ARGV[1])
return 1
"""


@transient_redis_errors
class RedisRecordBackend:
    """One hash per job under ``hlsvault:job:<id>``, and the sorted sets that index them."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._arrive = client.register_script(_ARRIVE)
        self._write_and_queue = client.register_script(_WRITE_AND_QUEUE)
        self._write_unless_ended = client.register_script(_WRITE_UNLESS_ENDED)
        self._start_stage = client.register_script(_START_STAGE)
        self._place_existing = client.register_script(_PLACE_EXISTING)
        self._write_outputs = client.register_script(_WRITE_OUTPUTS)
        self._claim_output = client.register_script(_CLAIM_OUTPUT)
        self._indexed = False

    @classmethod
    def from_url(cls, url: str) -> RedisRecordBackend:
        return cls(connect(url))

    def create(self, job_id: str, fields: dict[str, str]) -> None:
        pipe = self.client.pipeline()
        pipe.hset(_PREFIX + job_id, mapping=_mapping(fields))
        pipe.expire(_PREFIX + job_id, RECORD_TTL_S)
        created = float(fields.get("created_at", "0"))
        pipe.zadd(_INDEX, {job_id: created})
        pipe.zadd(_STATUS_INDEX + fields.get("status", "queued"), {job_id: created})
        pipe.execute()

    def read(self, job_id: str) -> dict[str, str]:
        fields = {str(k): str(v) for k, v in self.client.hgetall(_PREFIX + job_id).items()}
        if not fields:
            raise UnknownJob(job_id)
        return fields

    def write(self, job_id: str, fields: dict[str, str]) -> None:
        self.client.hset(_PREFIX + job_id, mapping=_mapping(fields))

    def increment(self, job_id: str, name: str, amount: int) -> int:
        return int(self.client.hincrby(_PREFIX + job_id, name, amount))

    def start_stage(
        self, job_id: str, counter: str, fields: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        args = [job_id, counter, *(item for pair in fields.items() for item in pair)]
        attempts, flat = self._start_stage(keys=[_PREFIX + job_id, *_STATUS_KEYS], args=args)
        items = [str(item) for item in flat]
        return int(attempts), dict(zip(items[::2], items[1::2], strict=True))

    def write_unless_ended(self, job_id: str, fields: dict[str, str]) -> bool:
        args: list[str | int] = [job_id, RECORD_TTL_S]
        args += [item for pair in fields.items() for item in pair]
        return bool(self._write_unless_ended(keys=[_PREFIX + job_id, *_STATUS_KEYS], args=args))

    def write_and_queue(
        self, job_id: str, fields: dict[str, str], once: dict[str, str], statuses: Sequence[str]
    ) -> list[str]:
        own = [item for pair in fields.items() for item in pair]
        kept = [item for pair in once.items() for item in pair]
        args: list[str | int] = [len(own), *own, len(kept), *kept, *statuses]
        marked = self._write_and_queue(keys=[_PREFIX + job_id], args=args)
        return [str(name) for name in marked]

    def arrive(
        self, job_id: str, counter: str, marker: str, fields: dict[str, str],
        then: Sequence[str],
    ) -> tuple[int, bool, list[str]]:
        own = [item for pair in fields.items() for item in pair]
        args: list[str | int] = [counter, marker, len(own), *own, *then]
        left, counted, marked = self._arrive(keys=[_PREFIX + job_id], args=args)
        return int(left), bool(counted), [str(name) for name in marked]

    def read_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(_PREFIX + job_id)
        return [
            {str(k): str(v) for k, v in found.items()} if found else None
            for found in pipe.execute()
        ]

    def write_outputs(self, job_id: str, fields: dict[str, str]) -> None:
        args: list[str | int] = [RECORD_TTL_S, *(item for pair in fields.items() for item in pair)]
        self._write_outputs(keys=[_OUTPUTS + job_id], args=args)

    def claim_output(self, job_id: str, name: str, value: str) -> str | None:
        stands = self._claim_output(keys=[_OUTPUTS + job_id, _PREFIX + job_id],
                                    args=[RECORD_TTL_S, name, value])
        return None if stands is None else str(stands)

    def read_outputs(self, job_id: str, names: Sequence[str] | None) -> dict[str, str]:
        if names is None:
            found = self.client.hgetall(_OUTPUTS + job_id)
            return {str(k): str(v) for k, v in found.items()}
        if not names:
            return {}
        values = self.client.hmget(_OUTPUTS + job_id, list(names))
        return {name: str(v) for name, v in zip(names, values, strict=True) if v is not None}

    def drop_outputs(self, job_id: str) -> None:
        self.client.delete(_OUTPUTS + job_id)

    def _ensure_indexed(self) -> None:
        """Place the records of a deployment older than the status sets in them, once."""
        if self._indexed or self.client.exists(_INDEXED_MARKER):
            self._indexed = True
            return
        cursor = None
        while cursor != 0:  # ZSCAN ends with cursor 0 after one pass over the set
            cursor, members = self.client.zscan(_INDEX, cursor or 0, count=_BACKFILL_BATCH)
            pipe = self.client.pipeline(transaction=False)
            for job_id, _ in members:
                self._place_existing(keys=[_PREFIX + str(job_id), *_STATUS_KEYS],
                                     args=[str(job_id)], client=pipe)
            pipe.execute()
        self.client.set(_INDEXED_MARKER, "1")
        self._indexed = True

    def newest(self, limit: int, status: str | None) -> list[str]:
        self._ensure_indexed()
        key = _INDEX if status is None else _STATUS_INDEX + status
        return [str(job_id) for job_id in self.client.zrevrange(key, 0, limit - 1)]

    def status_counts(self, now: float) -> dict[str, int]:
        # Records expire; their entries are dropped here once surely expired: a status set's
        # score is when its record's expiry was last set, and a job created that long ago is
        # far below the newest any list shows.
        self._ensure_indexed()
        expired = now - RECORD_TTL_S
        pipe = self.client.pipeline(transaction=False)
        for key in (_INDEX, *_STATUS_KEYS):
            pipe.zremrangebyscore(key, "-inf", f"({expired}")
        for key in _STATUS_KEYS:
            pipe.zcard(key)
        cards = pipe.execute()[len(_STATUS_KEYS) + 1 :]
        return {status: int(count) for status, count in zip(STATUSES, cards, strict=True)}

    def finished_counts(self, start: float, end: float) -> dict[str, int]:
        self._ensure_indexed()
        pipe = self.client.pipeline(transaction=False)
        for status in TERMINAL:
            pipe.zcount(_STATUS_INDEX + status, start, f"({end}")
        return {
            status: int(count) for status, count in zip(TERMINAL, pipe.execute(), strict=True)
        }
