"""The on-disk outbox: every record from the moment it is published until the broker
has acknowledged it, in order (a write-ahead log).

A folder of append-only segment files (`<id>.seg`, ids increasing) and a `cursor`
file naming the first record not yet delivered. Each record is one frame:

    u32 length of body | u32 CRC-32 of body | body
    body: i64 timestamp ms | u16 topic length, topic | i32 key length (-1: none), key
          | u32 value length, value | u16 header count, then per header:
          u16 name length, name, u32 value length, value      (big-endian throughout)

A batch of frames is written with one write(2), so a killed process leaves whole frames
in the page cache; fsync(2) runs on the schedule the caller sets. A bad frame (torn by
a power loss, or damaged) makes the rest of its segment unreadable: those bytes are
moved to `<id>.seg.corrupt`, reported to `on_corrupt`, and reading goes on with the
next segment.

Two threads may use it at once: one appends (the publisher's event loop, so that a
record is written before its request is answered), the other reads, commits and syncs.
A lock guards the bookkeeping, never a read of a segment nor a scheduled fsync, so an
append does not wait for the disk unless fsync_ms is 0. A lock file keeps a second
process from using the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

FRAME = struct.Struct(">II")
MAX_BODY = 64 << 20  # a longer length field is taken for corruption


@dataclass
class Record:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int = 0
    # called once with "" when the broker acknowledges the record, else with what became
    # of it ("outbox", or why it was lost); in memory only, never written to the outbox
    done: Callable[[str], None] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


class OutboxFull(OSError):
    """The outbox holds max_bytes already."""


def encode_body(r: Record) -> bytes:
    topic = r.topic.encode()
    parts = [struct.pack(">qH", r.timestamp_ms, len(topic)), topic]
    if r.key is None:
        parts.append(struct.pack(">i", -1))
    else:
        parts += [struct.pack(">i", len(r.key)), r.key]
    parts += [struct.pack(">I", len(r.value)), r.value, struct.pack(">H", len(r.headers))]
    for name, value in r.headers:
        n = name.encode()
        parts += [struct.pack(">H", len(n)), n, struct.pack(">I", len(value)), value]
    return b"".join(parts)


def decode_body(body: bytes) -> Record:
    """Raises ValueError (or struct.error) on a malformed body."""
    view, pos = memoryview(body), 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise ValueError("record body ends early")
        chunk = bytes(view[pos:pos + n])
        pos += n
        return chunk

    timestamp_ms, topic_len = struct.unpack(">qH", take(10))
    topic = take(topic_len).decode()
    (key_len,) = struct.unpack(">i", take(4))
    key = None if key_len < 0 else take(key_len)
    (value_len,) = struct.unpack(">I", take(4))
    value = take(value_len)
    (count,) = struct.unpack(">H", take(2))
    headers = []
    for _ in range(count):
        (n,) = struct.unpack(">H", take(2))
        name = take(n).decode()
        (v,) = struct.unpack(">I", take(4))
        headers.append((name, take(v)))
    if pos != len(view):
        raise ValueError("bytes left after the record")
    return Record(topic, key, value, headers, timestamp_ms)


def frame(r: Record) -> bytes:
    body = encode_body(r)
    return FRAME.pack(len(body), zlib.crc32(body)) + body


class Outbox:
    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = 64 << 20,
                 max_bytes: int = 1 << 30, fsync_ms: int = 1000,
                 on_corrupt: Callable[[Path, int, str], None] | None = None):
        """fsync_ms: 0 syncs every append; N > 0 at most N ms after an append (see `tick`);
        negative never (the kernel writes back when it likes)."""
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync_ms = fsync_ms
        self.on_corrupt = on_corrupt
        self.segments: dict[int, int] = {}  # id -> bytes
        self.cursor = Position(1, 0)
        self.tail: int | None = None  # the segment this process appends to
        self.tail_fd: int | None = None
        self.dirty: set[int] = set()  # segments written since their last fsync
        self.new_segment = False  # created since the folder's last fsync
        self.dirty_since: float | None = None
        self.lock_fd: int | None = None
        self.lock = threading.RLock()

    # -- open and close --------------------------------------------------------------------

    def open(self) -> "Outbox":
        """Take the folder over. Appends go to a new segment, so none ever follows a frame
        torn by a crash; reading finds such a frame and reports it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(errno.EBUSY, f"outbox {self.dir} is in use by another process") from None
        self.lock_fd = fd
        for path in self.dir.glob("*.seg"):
            if path.stem.isdigit():
                self.segments[int(path.stem)] = path.stat().st_size
        self.cursor = self.read_cursor()
        for seg in [s for s in self.segments if s < self.cursor.segment]:
            self.remove(seg)  # delivered before a crash, not yet removed
        if self.segments and self.cursor.segment not in self.segments:
            self.cursor = Position(min(self.segments), 0)
        return self

    def close(self) -> None:
        """Release the folder; an empty outbox leaves no files behind."""
        self.sync()
        with self.lock:
            self.close_tail()
        if self.lock_fd is None:
            return
        if self.empty():
            for seg in list(self.segments):
                self.remove(seg)
            for name in ("cursor", "lock"):
                (self.dir / name).unlink(missing_ok=True)
            try:
                self.dir.rmdir()
            except OSError:
                pass  # not empty, or a mount point
        os.close(self.lock_fd)
        self.lock_fd = None

    def read_cursor(self) -> Position:
        first = min(self.segments, default=1)
        try:
            data = json.loads((self.dir / "cursor").read_text())
            return Position(int(data["segment"]), int(data["offset"]))
        except FileNotFoundError:
            return Position(first, 0)
        except (ValueError, KeyError, TypeError) as exc:
            self.report(self.dir / "cursor", 0, f"unreadable cursor ({exc}); replaying from segment {first}")
            return Position(first, 0)

    # -- writing ---------------------------------------------------------------------------

    def path(self, seg: int) -> Path:
        return self.dir / f"{seg:016d}.seg"

    @property
    def pending_bytes(self) -> int:
        with self.lock:
            return sum(self.segments.values()) - (self.cursor.offset if self.cursor.segment in self.segments else 0)

    def empty(self) -> bool:
        return self.pending_bytes == 0

    def append(self, records: list[Record]) -> tuple[Position, Position]:
        """Append records in order; returns where the batch starts and ends. Raises
        OutboxFull, or the disk's OSError (ENOSPC, EIO, ...), leaving no part of the batch
        behind."""
        data = b"".join(frame(r) for r in records)
        with self.lock:
            if self.pending_bytes + len(data) > self.max_bytes:
                raise OutboxFull(errno.ENOSPC, f"outbox {self.dir} holds {self.pending_bytes} bytes, "
                                               f"the limit is {self.max_bytes}")
            if self.tail is None or (self.segments[self.tail] and
                                     self.segments[self.tail] + len(data) > self.segment_bytes):
                self.roll()
            size = self.segments[self.tail]
            try:
                written = self.write(self.tail_fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short write to {self.path(self.tail)}: "
                                                f"{written} of {len(data)} bytes")
            except OSError:
                try:
                    os.ftruncate(self.tail_fd, size)
                except OSError:
                    pass
                raise
            self.segments[self.tail] = size + len(data)
            if self.fsync_ms == 0:
                os.fsync(self.tail_fd)
            elif self.fsync_ms > 0:
                self.dirty.add(self.tail)
                if self.dirty_since is None:
                    self.dirty_since = time.monotonic()
            return Position(self.tail, size), Position(self.tail, size + len(data))

    write = staticmethod(os.write)  # one call per batch of frames (a seam for tests)

    def roll(self) -> None:
        self.close_tail()
        seg = max(max(self.segments, default=0) + 1, self.cursor.segment)
        self.tail_fd = os.open(self.path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.tail = seg
        self.segments[seg] = 0
        if len(self.segments) == 1:
            self.cursor = Position(seg, 0)
        if self.fsync_ms == 0:
            self.sync_folder()
        else:
            self.new_segment = True

    def close_tail(self) -> None:
        if self.tail_fd is not None:
            os.close(self.tail_fd)
        self.tail = self.tail_fd = None

    def sync(self) -> None:
        """fsync the segments written since the last sync, each through a descriptor of
        its own (the appending thread may close the tail meanwhile), and the folder, which
        names new segments."""
        with self.lock:
            dirty, self.dirty, self.dirty_since = self.dirty, set(), None
            new_segment, self.new_segment = self.new_segment, False
        for seg in sorted(dirty):
            try:
                fd = os.open(self.path(seg), os.O_RDONLY)
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if new_segment and self.fsync_ms >= 0:
            self.sync_folder()

    def sync_folder(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def tick(self) -> None:
        """Call often: syncs once fsync_ms have passed since the first unsynced append."""
        if self.dirty_since is not None and time.monotonic() - self.dirty_since >= self.fsync_ms / 1000:
            self.sync()

    # -- reading ---------------------------------------------------------------------------

    def read(self, max_records: int = 500, max_bytes: int = 4 << 20) -> list[tuple[Position, Position, Record]]:
        """Up to max_records from the cursor on, as (start, end, record). The cursor does
        not move: `commit` moves it once they are delivered. Appends meanwhile are not
        seen: it reads up to the sizes segments had when it began."""
        out: list[tuple[Position, Position, Record]] = []
        with self.lock:
            pos, sizes = self.cursor, dict(self.segments)
        while len(out) < max_records and max_bytes > 0:
            later = sorted(s for s in sizes if s > pos.segment or (s == pos.segment and pos.offset < sizes[s]))
            if not later:
                break
            if later[0] != pos.segment:
                pos = Position(later[0], 0)
            seg, size, at = pos.segment, sizes[pos.segment], pos.offset
            with open(self.path(seg), "rb") as f:
                f.seek(at)
                while at < size and len(out) < max_records and max_bytes > 0:
                    record, length, problem = self.read_frame(f, size - at)
                    if problem:
                        self.quarantine(seg, at, problem)
                        sizes[seg] = at
                        break
                    out.append((Position(seg, at), Position(seg, at + length), record))
                    at += length
                    max_bytes -= length
            pos = Position(seg, at)
        return out

    @staticmethod
    def read_frame(f, available: int) -> tuple[Record | None, int, str]:
        """(record, frame length, "") or (None, 0, what is wrong)."""
        head = f.read(FRAME.size)
        if len(head) < FRAME.size or available < FRAME.size:
            return None, 0, "torn frame header"
        length, crc = FRAME.unpack(head)
        if length > MAX_BODY:
            return None, 0, f"implausible frame length {length}"
        if FRAME.size + length > available:
            return None, 0, "torn frame"
        body = f.read(length)
        if zlib.crc32(body) != crc:
            return None, 0, "CRC mismatch"
        try:
            return decode_body(body), FRAME.size + length, ""
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            return None, 0, f"malformed record ({exc})"

    def quarantine(self, seg: int, offset: int, problem: str) -> None:
        """Move a segment's bytes from a bad frame on into `<id>.seg.corrupt` (kept for
        a person to look at); the frames before it stay, and reading goes on with the
        next segment."""
        path = self.path(seg)
        aside = path.with_name(path.name + ".corrupt")
        with self.lock:
            if seg == self.tail:  # appends go on in a new segment, never after the bad frame
                self.close_tail()
            with open(path, "rb") as f:
                f.seek(offset)
                aside.write_bytes(f.read())
            os.truncate(path, offset)
            self.segments[seg] = offset
        self.report(path, offset, f"{problem}; {aside.stat().st_size} bytes from there set aside as {aside.name}")

    def report(self, path: Path, offset: int, problem: str) -> None:
        log.error("outbox: %s, byte %d: %s", path, offset, problem)
        if self.on_corrupt is not None:
            self.on_corrupt(path, offset, problem)

    # -- delivery --------------------------------------------------------------------------

    def commit(self, end: Position) -> None:
        """Everything before `end` is delivered: move the cursor there and remove the
        segments read to their end, except the one appended to."""
        with self.lock:
            self.cursor = end
            done = [seg for seg in self.segments if seg != self.tail and
                    (seg < end.segment or (seg == end.segment and end.offset >= self.segments[seg]))]
            for seg in done:
                self.segments.pop(seg)
            if self.cursor.segment not in self.segments:
                later = [s for s in self.segments if s > self.cursor.segment]
                self.cursor = Position(min(later) if later else self.cursor.segment + 1, 0)
            cursor = self.cursor
        for seg in done:
            self.path(seg).unlink(missing_ok=True)
        self.write_cursor(cursor)

    def remove(self, seg: int) -> None:
        try:
            self.path(seg).unlink()
        except FileNotFoundError:
            pass
        self.segments.pop(seg, None)

    def write_cursor(self, cursor: Position) -> None:
        tmp = self.dir / "cursor.tmp"
        with open(tmp, "w") as f:
            json.dump({"segment": cursor.segment, "offset": cursor.offset}, f)
            if self.fsync_ms == 0:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / "cursor")
