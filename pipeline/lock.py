"""One job per run directory: a lease file naming its holder, kept alive by a heartbeat.

RUN/.lease.json holds the holder's host, pid, start time, heartbeat time and a random token.
It is created only if absent (atomically: written aside, then hard-linked into place, so a
reader never sees half a lease). A daemon thread rewrites the heartbeat every ``interval``
seconds. A second job finds the lease and is refused with RunDirBusy naming the holder, unless
the lease is stale: its heartbeat is older than ``stale_after`` intervals, or its holder runs
on this host and its pid is gone. A stale lease is replaced only if it is still the one
judged stale (its token compared under a mutex), so of racers exactly one takes it over.

Storage goes through a store's four operations (create-if-absent, read, replace-if-token,
delete-if-token). On a local or POSIX-shared disk: a hard link and an flock (LocalLeaseStore).
On s3:// (AWS S3, MinIO, any server with S3 conditional writes): a put with If-None-Match: *
creates, and a put or delete with If-Match on the ETag just read replaces or deletes, so the
same guarantee holds: of racers exactly one creates or takes over the lease (S3LeaseStore).
On other object stores (gs://): create-if-absent is an existence check then a write, re-read
to confirm it is ours (ObjectLeaseStore): two jobs started within the same second may both
pass; a later one is always refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import storage

LEASE = ".lease.json"
INTERVAL_S = 10.0  # heartbeat period
STALE_AFTER = 6  # heartbeats missed before another host may take the lease over


class RunDirBusy(ValueError):
    """Another live job holds the run directory (a ValueError: the jobs print it as `error:`)."""


class LocalLeaseStore:
    """The lease as a file on a local (or POSIX-shared) file system.

    Creation is atomic by itself (a hard link fails if the lease exists); the conditional
    replace and delete compare the holder's token under an flock, which the kernel drops
    when its process dies, so it never goes stale. An object store does the same with a
    conditional put (If-None-Match: *) and a put or delete conditioned on the ETag read.
    """

    def __init__(self, path: Path):
        self.path = path

    def _aside(self, data: bytes) -> Path:
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        return tmp

    def create(self, data: bytes) -> bool:
        """Write `data` as the lease if there is none; False if there is one."""
        tmp = self._aside(data)
        try:
            os.link(tmp, self.path)  # fails if the lease exists; readers see it whole
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _holding(self, token: str | None) -> Iterator[bool]:
        """Under the store's mutex: whether the lease there still carries `token`."""
        with open(self.path.with_name(f"{self.path.name}.mutex"), "a") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            try:
                data = self.read()
                yield data is not None and _parse(data).get("token") == token
            finally:
                fcntl.flock(mutex, fcntl.LOCK_UN)

    def replace_if(self, token: str | None, data: bytes) -> bool:
        """Replace the lease with `data` if it still carries `token`."""
        with self._holding(token) as same:
            if same:
                os.replace(self._aside(data), self.path)
            return same

    def delete_if(self, token: str) -> bool:
        with self._holding(token) as same:
            if same:
                self.path.unlink()
            return same


class S3LeaseStore:
    """The lease as an S3 object, changed only through conditional requests (see above)."""

    def __init__(self, uri: str):
        import boto3  # reads AWS_ENDPOINT_URL and the credentials as s3fs does

        self.bucket, _, self.key = uri[len("s3://") :].partition("/")
        self.client = boto3.client("s3")

    @staticmethod
    def _refused(e: Exception) -> bool:
        # 412: the condition failed; 409: a concurrent conditional write won the race.
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def create(self, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
            return True
        except self.client.exceptions.ClientError as e:
            if self._refused(e):
                return False
            raise

    def _get(self) -> tuple[bytes, str] | None:
        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return out["Body"].read(), out["ETag"]

    def read(self) -> bytes | None:
        got = self._get()
        return None if got is None else got[0]

    def _if_holding(self, token: str | None, action) -> bool:
        got = self._get()
        if got is None or _parse(got[0]).get("token") != token:
            return False
        try:
            action(got[1])
            return True
        except self.client.exceptions.ClientError as e:
            if self._refused(e):
                return False
            raise

    def replace_if(self, token: str | None, data: bytes) -> bool:
        return self._if_holding(
            token,
            lambda etag: self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=data, IfMatch=etag
            ),
        )

    def delete_if(self, token: str) -> bool:
        return self._if_holding(
            token,
            lambda etag: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag),
        )


class ObjectLeaseStore:
    """The lease as an object on a store without conditional writes here (see above)."""

    def __init__(self, uri: str):
        self.uri = uri

    def create(self, data: bytes) -> bool:
        if storage.exists(self.uri):
            return False
        storage.write_bytes(self.uri, data)
        return self.read() == data  # a racer that wrote after us owns it

    def read(self) -> bytes | None:
        try:
            return storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None

    def replace_if(self, token: str | None, data: bytes) -> bool:
        current = self.read()
        if current is None or _parse(current).get("token") != token:
            return False
        storage.write_bytes(self.uri, data)
        return True

    def delete_if(self, token: str) -> bool:
        current = self.read()
        if current is None or _parse(current).get("token") != token:
            return False
        storage.remove(self.uri)
        return True


def lease_store(root: str) -> Any:
    """The lease store for a run dir: local file, S3 conditional writes, or another store."""
    path = storage.join(root, LEASE)
    if not storage.is_uri(root):
        return LocalLeaseStore(Path(path))
    if root.startswith("s3://"):
        return S3LeaseStore(path)
    return ObjectLeaseStore(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    age = (now or time.time()) - lease.get("heartbeat", 0)
    return (
        f"pid {lease.get('pid')} on {lease.get('host')} (started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lease.get('started', 0)))}, "
        f"last heartbeat {age:.0f} s ago)"
    )


def is_stale(lease: dict[str, Any], interval: float, stale_after: int, now: float) -> bool:
    if now - lease.get("heartbeat", 0) > stale_after * interval:
        return True
    return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0)))


def _parse(data: bytes) -> dict[str, Any]:
    try:
        lease = json.loads(data)
    except ValueError:
        lease = None
    # An unreadable lease (a foreign file, a disk error) names no live holder: it is stale.
    return lease if isinstance(lease, dict) else {"heartbeat": 0}


class Lease:
    """The lease on one run directory, held between acquire() and release()."""

    def __init__(
        self,
        root: str | os.PathLike,
        interval: float = INTERVAL_S,
        stale_after: int = STALE_AFTER,
        store: Any = None,
    ):
        self.root = storage.normalize(root)
        self.interval, self.stale_after = interval, stale_after
        self.store = store or lease_store(self.root)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when another job took the lease over (we stalled too long)

    def _record(self) -> bytes:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "heartbeat": time.time(),
                "token": self.token,
            }
        ).encode()

    def _current(self) -> dict[str, Any] | None:
        data = self.store.read()
        return None if data is None else _parse(data)

    def acquire(self) -> Lease:
        storage.makedirs(self.root)
        for _ in range(3):  # a lost race against another taker is retried once or twice
            if self.store.create(self._record()):
                self._start()
                return self
            held = self._current()
            if held is None:
                continue  # released meanwhile
            if not is_stale(held, self.interval, self.stale_after, time.time()):
                raise RunDirBusy(
                    f"run directory {self.root} is in use by another job: {describe(held)}; "
                    f"wait for it, or remove {storage.join(self.root, LEASE)} if that job is gone"
                )
            # Only the lease judged stale is replaced: of racers, one wins, the rest retry.
            if self.store.replace_if(held.get("token"), self._record()):
                self._start()
                return self
        raise RunDirBusy(f"run directory {self.root}: could not take its lease over (contended)")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-dir-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.store.replace_if(self.token, self._record()):
                self.lost = True  # taken over after we missed heartbeats: do not clobber it
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.store.delete_if(self.token)


@contextlib.contextmanager
def hold_run_dir(
    root: str | os.PathLike, interval: float = INTERVAL_S, stale_after: int = STALE_AFTER
) -> Iterator[Lease]:
    """Hold RUN's lease for the block; RunDirBusy if a live job holds it."""
    lease = Lease(root, interval, stale_after).acquire()
    try:
        yield lease
    finally:
        lease.release()
