"""The pin store's writer: a background thread that owns the file.

One thread per :class:`~dtx.trust.pins.PinStore` with a file. It appends
each batch of changes (coalesced over ``PinStoreConfig.write_delay``) to
the journal under an exclusive ``flock`` and fsyncs it, compacts the
journal by an atomic rewrite (temporary file, fsync, rename, fsync of the
folder) once it holds more than twice the live pins plus
``COMPACT_SLACK`` records, and takes in what other writers appended or
replaced (looked for every ``reload_interval``). The table of pins it
shares with the store is changed only under the store's lock, and never
while the disk is being waited for. Internal: the public API is
:class:`dtx.trust.PinStore`.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Final

from dtx.errors import TrustError
from dtx.logs import LogLimiter
from dtx.trust.pinfile import (
    HEADER,
    MAX_LINE_BYTES,
    Change,
    Scan,
    V1Reader,
    bare_of,
    encode_change,
    is_journal_header,
    scan_lines,
)

if TYPE_CHECKING:
    from dtx.trust.pins import PinStoreConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("dtx.trust.pins")

#: Compact when the journal holds more than twice the live pins plus this.
COMPACT_SLACK: Final = 1024
#: More records than this appended by another process: reload the whole
#: file on the writer thread rather than replaying them under the lock.
_MAX_TAIL_RECORDS: Final = 1000


@dataclass
class Counters:
    """What :class:`~dtx.trust.pins.PinStoreStatistics` reports."""

    writes: int = 0
    compactions: int = 0
    records_skipped: int = 0
    accepted_unpinned: int = 0
    refused: int = 0
    write_errors: int = 0


class Table:
    """Pins by account: bare JID -> {full JID -> key}.

    The inner dicts are never changed in place (a change copies the
    account's dict, at most ``max_pins_per_account`` entries), so a shallow
    copy of ``accounts`` taken under the lock is a snapshot the writer
    thread can read without it.
    """

    __slots__ = ("accounts", "count")

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, bytes]] = {}
        self.count = 0

    def get(self, full: str) -> bytes | None:
        account = self.accounts.get(bare_of(full))
        return None if account is None else account.get(full)

    def refusal(self, full: str, config: PinStoreConfig) -> str | None:
        """Why a pin for ``full`` would not fit ("account", "store"), or None."""
        account = self.accounts.get(bare_of(full))
        if account is not None and full in account:
            return None  # replaces a pin
        if account is not None and len(account) >= config.max_pins_per_account:
            return "account"
        if self.count >= config.max_pins:
            return "store"
        return None

    def apply(self, op: Change) -> int:
        """Make the change; returns how many pins it removed."""
        bare = bare_of(op.jid)
        account = self.accounts.get(bare)
        if op.key is not None:
            if account is None:
                self.accounts[bare] = {op.jid: op.key}
                self.count += 1
            else:
                changed = dict(account)
                self.count += op.jid not in changed
                changed[op.jid] = op.key
                self.accounts[bare] = changed
            return 0
        if account is None:
            return 0
        if op.jid == bare:
            del self.accounts[bare]
            removed = len(account)
        elif op.jid in account:
            changed = dict(account)
            del changed[op.jid]
            if changed:
                self.accounts[bare] = changed
            else:
                del self.accounts[bare]
            removed = 1
        else:
            return 0
        self.count -= removed
        return removed

    def replay(self, op: Change, config: PinStoreConfig) -> bool:
        """Apply a change read from the file, within the bounds; False if
        a pin was left out for want of room."""
        if op.key is not None and self.refusal(op.jid, config) is not None:
            return False
        self.apply(op)
        return True


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sync_directory(directory: str) -> None:
    """fsync a folder, so that a rename or link in it survives a crash."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


_registry_lock = threading.Lock()
_registry: dict[str, set[Journal]] = {}


class Journal:
    """The file side of one :class:`PinStore`: loading, the writer thread,
    appends, compaction, and noticing what other processes wrote.

    It holds no reference to its PinStore, so a store that is dropped is
    collected, and its finaliser closes (flushes) the journal.
    """

    def __init__(self, path: str, table: Table, cond: threading.Condition,
                 config: PinStoreConfig, counters: Counters) -> None:
        self.path = path
        self._key = os.path.realpath(path)
        self._where = f"pin store {path}"
        self._table = table
        self._cond = cond
        self._config = config
        self._n = counters
        self._limiter = LogLimiter(logger)
        # Shared with callers, under ``cond``.
        self._pending: list[Change] = []
        self._submitted = 0
        self._written = 0
        self._requested = 0
        self._done = 0
        self._closing = False
        self._error: Exception | None = None
        # File state; after start() touched by the writer thread only.
        self._ident: tuple[int, int, int, int] | None = None  # (dev, ino, size, mtime)
        self._offset = 0  # end of the last complete record read or written
        self._records = 0  # lines in the journal (for compaction)
        self._legacy = False  # a version-1 file: rewritten as a journal at the first change
        self._partial = False  # bytes after _offset that are no complete line (a torn append)
        self._stopped = False  # the writer thread has ended
        self._thread = threading.Thread(
            target=self._run, name=f"dtx-pins:{os.path.basename(path)}", daemon=True)

    # -- opening --------------------------------------------------------------

    def open(self) -> None:
        """Flush this process's other stores of the file, load it, start
        the writer. Raises TrustError for a file that cannot be used."""
        with _registry_lock:
            siblings = list(_registry.get(self._key, ()))
        for sibling in siblings:
            try:
                sibling.flush()
            except TrustError as exc:
                logger.warning("%s", exc)
        fresh = self._load()
        with self._cond:
            self._table.accounts, self._table.count = fresh.accounts, fresh.count
        with _registry_lock:
            _registry.setdefault(self._key, set()).add(self)
        self._thread.start()

    def _load(self) -> Table:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            self._ident = None
            return Table()
        except OSError as exc:
            raise TrustError(f"cannot read {self._where}: {exc.strerror}") from exc
        with f:
            try:
                if fcntl is not None:  # no append is half done while we read
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                return self._read(f)
            except OSError as exc:
                raise TrustError(f"cannot read {self._where}: {exc.strerror}") from exc

    def _read(self, f: BinaryIO) -> Table:
        """The pins of the whole file, within the bounds; sets the file state."""
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TrustError(f"{self._where} is not a regular file")
        f.seek(0)
        first = f.readline(MAX_LINE_BYTES + 1)
        table = Table()
        config = self._config
        left_out = 0
        if is_journal_header(first):
            scan = scan_lines(f, len(first))
            for op in scan.ops:
                left_out += not table.replay(op, config)
            skipped = scan.skipped + scan.partial
            self._offset, self._records, self._legacy = scan.end, scan.records, False
            self._partial = scan.partial
            self._ident = _ident(os.fstat(f.fileno()))
        else:
            f.seek(0)
            reader = V1Reader(f, self._where)
            skipped = 0
            for entry in reader.pins(lambda: table.count >= config.max_pins):
                left_out += entry is None or not table.replay(Change(*entry), config)
            self._offset, self._records, self._legacy = f.tell(), table.count, True
            self._partial = False
            self._ident = _ident(os.fstat(f.fileno()))
        self._n.records_skipped += skipped + left_out
        if skipped:
            logger.warning("%s: ignored %d torn or malformed record(s)", self._where, skipped)
        if left_out:
            logger.warning(
                "%s: %d pin(s) over the bounds (%d per account, %d in all) were not "
                "loaded; they are dropped from the file at its next rewrite",
                self._where, left_out, config.max_pins_per_account, config.max_pins)
        return table

    # -- callers (under cond) --------------------------------------------------

    def ensure_open(self) -> None:
        """Raise TrustError once closed: no change could reach the file."""
        if self._closing:
            raise TrustError(f"{self._where} is closed")

    def submit(self, op: Change) -> None:
        """Queue a change made to the table (the caller holds ``cond``)."""
        self.ensure_open()
        self._pending.append(op)
        self._submitted += 1
        if len(self._pending) == 1:
            self._cond.notify_all()  # start the write delay

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write every change made so far and pick up other processes'
        changes, now; waits for the writer thread. Raises TrustError if the
        changes could not be written."""
        with self._cond:
            target = self._submitted
            if self._thread.is_alive():
                self._requested += 1
                generation = self._requested
                self._cond.notify_all()
                while self._done < generation and not self._stopped:
                    self._cond.wait()
            if self._written < target:
                raise TrustError(
                    f"cannot write {self._where}: {self._error or 'the store is closed'}")

    def close(self) -> None:
        """Write what is pending and stop the writer (idempotent)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        with _registry_lock:
            same = _registry.get(self._key)
            if same is not None:
                same.discard(self)
                if not same:
                    del _registry[self._key]
        if self._pending:
            logger.error("%s: %d change(s) could not be written: %s",
                         self._where, len(self._pending), self._error)

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _loop(self) -> None:
        config = self._config
        while True:
            watch = False
            with self._cond:
                deadline: float | None = None
                while not self._closing and self._requested <= self._done:
                    if self._pending:
                        delay = config.write_delay if self._error is None else config.reload_interval
                        now = time.monotonic()
                        deadline = now + delay if deadline is None else deadline
                        if now >= deadline:
                            break
                        self._cond.wait(deadline - now)
                    elif not self._cond.wait(config.reload_interval):
                        watch = True
                        break
                ops, self._pending = self._pending, []
                generation, closing = self._requested, self._closing
            if ops or generation > self._done or closing or (watch and self._changed()):
                self._step(ops)
            with self._cond:
                self._done = max(self._done, generation)
                self._cond.notify_all()
            if closing:
                return

    def _changed(self) -> bool:
        """Whether the file is not as this store last left it (cheap stat)."""
        try:
            return _ident(os.stat(self.path)) != self._ident
        except FileNotFoundError:
            return self._ident is not None
        except OSError:
            return True

    def _step(self, ops: list[Change]) -> None:
        try:
            self._sync(ops)
        except (OSError, TrustError) as exc:
            with self._cond:
                self._pending[:0] = ops
                self._error = exc
            self._n.write_errors += 1
            self._limiter.warning("write", self.path, "cannot update %s: %s", self._where, exc)
            return
        with self._cond:
            self._written += len(ops)
            self._error = None

    def _sync(self, ops: list[Change]) -> None:
        """Under the file's lock: take in what others wrote, then write ``ops``."""
        for _ in range(8):  # the file may be replaced while we wait for its lock
            try:
                f = open(self.path, "r+b")
            except FileNotFoundError:
                if self._ident is not None:  # deleted under us: its pins are forgotten
                    logger.info("%s was removed; its pins are forgotten", self._where)
                    self._adopt(Table(), ops)
                    self._ident, self._offset, self._records = None, 0, 0
                    self._legacy = self._partial = False
                if not ops:
                    return
                self._create()
                continue
            with f:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                st = os.fstat(f.fileno())
                try:
                    now_there = os.stat(self.path)
                except FileNotFoundError:
                    continue
                if (now_there.st_dev, now_there.st_ino) != (st.st_dev, st.st_ino):
                    continue
                self._sync_open(f, st, ops)
                return
        raise TrustError(f"{self._where} keeps being replaced")

    def _create(self) -> None:
        """Create the file holding only the journal header, unless another
        writer has created it meanwhile (a hard link never replaces)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = self._write_temporary(directory, [HEADER])[0]
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            _unlink_quietly(tmp)
        _sync_directory(directory)

    def _write_temporary(self, directory: str,
                         parts: Iterable[bytes]) -> tuple[str, tuple[int, int, int, int], int]:
        """A new file in ``directory`` (mode 0600) holding ``parts``, synced:
        its name, identity and size."""
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                if os.name == "posix":
                    os.fchmod(out.fileno(), stat.S_IRUSR | stat.S_IWUSR)
                for part in parts:
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
                return tmp, _ident(os.fstat(out.fileno())), out.tell()
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _sync_open(self, f: BinaryIO, st: os.stat_result, ops: list[Change]) -> None:
        known = self._ident
        if known is None or known[:2] != (st.st_dev, st.st_ino) or st.st_size < self._offset:
            self._adopt(self._read(f), ops)  # replaced or rewritten: read it all
        elif _ident(st) != known:
            scan = scan_lines(f, self._offset, limit=_MAX_TAIL_RECORDS)
            if scan.records > _MAX_TAIL_RECORDS:
                self._adopt(self._read(f), ops)
            else:
                self._take_tail(scan, ops)
        if not ops:
            self._ident = _ident(os.fstat(f.fileno()))
            return
        if self._legacy or self._records + len(ops) > 2 * self._table.count + COMPACT_SLACK:
            self._compact()
            return
        data = b"".join(encode_change(op) for op in ops)
        if self._partial:
            data = b"\n" + data  # end the torn line, so it stays one bad record
        f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        self._records += len(ops) + self._partial
        self._offset, self._partial = f.tell(), False
        self._ident = _ident(os.fstat(f.fileno()))
        self._n.writes += 1

    def _take_tail(self, scan: Scan, ops: list[Change]) -> None:
        """Apply records another process appended; then this store's own
        changes again, since they come after them in the file."""
        table, config = self._table, self._config
        with self._cond:
            for op in scan.ops:
                self._n.records_skipped += not table.replay(op, config)
            for op in ops:
                table.apply(op)
            for op in self._pending:
                table.apply(op)
        self._n.records_skipped += scan.skipped
        self._offset, self._partial = scan.end, scan.partial
        self._records += scan.records

    def _adopt(self, fresh: Table, ops: list[Change]) -> None:
        """Make ``fresh`` (read from the file) the table, with this store's
        changes that are not in the file applied on top."""
        for op in ops:
            fresh.apply(op)
        with self._cond:
            for op in self._pending:
                fresh.apply(op)
            self._table.accounts, self._table.count = fresh.accounts, fresh.count

    def _compact(self) -> None:
        """Rewrite the file as a journal of the live pins, atomically (the
        caller holds the old file's lock). The snapshot holds every change
        made so far, so the pending ones are done with it."""
        with self._cond:
            accounts = dict(self._table.accounts)  # inner dicts are never changed
            moot, self._pending = self._pending, []
        directory = os.path.dirname(os.path.abspath(self.path))
        count = sum(len(a) for a in accounts.values())

        def parts() -> Iterator[bytes]:
            yield HEADER
            for bare in sorted(accounts):
                yield b"".join(encode_change(Change(j, k)) for j, k in sorted(accounts[bare].items()))

        try:
            tmp, ident, offset = self._write_temporary(directory, parts())
            try:
                os.replace(tmp, self.path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            _sync_directory(directory)  # make the rename itself durable
        except BaseException:
            with self._cond:
                self._pending[:0] = moot
            raise
        with self._cond:
            self._written += len(moot)
        self._ident, self._offset, self._records = ident, offset, count
        self._legacy = self._partial = False
        self._n.writes += 1
        self._n.compactions += 1
