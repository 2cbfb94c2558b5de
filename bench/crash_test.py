"""Crash test: privface-server killed with SIGKILL at random moments during concurrent
uploads and deletes, restarted each time, and checked after every restart.

A ledger records, per photo, what the phones were told: an upload is *acknowledged* once
BackupPhoto answered OK (or a retry of the same bytes did), a delete once DeletePhoto
answered OK; a call that ended with the server gone is *in flight* (its outcome unknown).
After each restart, with the phones paused:

* the store is consistent (bench/store_check.py: ``PRAGMA integrity_check`` ok, every
  photo row has its blob with the recorded size (and SHA-256, in the final check), no
  file no row names: the start-up sweep removed what the crash left);
* every acknowledged upload is listed, found by search, and (first check after its
  acknowledgement, and all again at the end) downloads and decrypts byte-identical;
* every acknowledged delete stays deleted (not listed, FetchPhoto NOT_FOUND);
* an in-flight upload is either absent or complete and correct, an in-flight delete
  either done or not: both are then settled from what the server shows.

``lost`` counts acknowledged uploads missing or corrupt plus acknowledged deletes undone:
the goal is 0. ``--faulty-ack`` runs a server patched to acknowledge uploads before their
row commits (the negative control): it must report losses.

SIGKILL ends the process, not the machine: the page cache survives, so this tests the
ordering (file durable, then row, then answer; row deleted, then file) and the start-up
sweep, not fsync against power loss.

    .venv/bin/python bench/crash_test.py --kills 200 --json bench/results/crash.json
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/, client/, ... importable
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_json  # noqa: E402
from bench.server_process import ServerProcess  # noqa: E402
from bench.store_check import StoreReport, check_store  # noqa: E402
from client.config import ClientConfig  # noqa: E402
from client.keystore import FamilyBundle  # noqa: E402
from client.pipeline import photos as pipeline  # noqa: E402
from client.pipeline.family import create_family  # noqa: E402
from client.rpc import Credentials, PrivfaceClient  # noqa: E402
from common import errors, labels, photo_crypto  # noqa: E402
from server.tls import write_dev_certs  # noqa: E402

ORPHANS_RE = re.compile(r"removed (\d+) orphan files")
FAULTY_ACK_DELAY = 0.6  # seconds the faulty server waits before committing an acked photo


# -- the ledger ----------------------------------------------------------------------------


@dataclass
class Photo:
    """One photo as the phones know it."""

    photo_id: str
    plain_sha256: bytes
    blob: bytes  # the encrypted bytes as sent (a retry sends the same)
    # sending, acked, unknown (in flight at a kill), absent (in flight, not stored: retried
    # later), deleting, deleted, delete-unknown, lost
    state: str = "sending"
    acked_upload: bool = False
    acked_delete: bool = False
    verified: bool = False  # downloaded and decrypted byte-identical after its ack
    deleted_unverified: bool = False  # acked delete not yet checked absent


@dataclass
class Ledger:
    """What the phones were told, per photo, and what the checks found."""

    photos: dict[str, Photo] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("uploads_attempted", "uploads_acked", "uploads_in_flight", "retries",
         "retries_already_stored", "deletes_attempted", "deletes_acked", "deletes_in_flight",
         "in_flight_uploads_present", "in_flight_uploads_absent", "in_flight_deletes_done",
         "in_flight_deletes_undone", "deletes_verified", "uploads_verified",
         "uploads_deleted_before_a_check"), 0))
    problems: list[str] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        """Adds to one counter (under the lock)."""
        with self.lock:
            self.counts[name] += n

    def lost(self) -> int:
        """Acknowledged uploads missing or corrupt, acknowledged deletes undone."""
        return sum(1 for p in self.problems if p.startswith("LOST"))


# -- the phones ----------------------------------------------------------------------------


class Gate:
    """Lets the phones run or pauses them; knows when none is inside a call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = False
        self._busy = 0
        self.stopped = False
        self.generation = 0  # bumped at each restart: phones open new channels

    def enter(self) -> bool:
        """Blocks while paused; False once stopped."""
        with self._cond:
            while not self._running and not self.stopped:
                self._cond.wait()
            if self.stopped:
                return False
            self._busy += 1
            return True

    def leave(self) -> None:
        """One call finished."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def run(self, new_generation: bool = False) -> None:
        """Lets the phones go (on new channels if ``new_generation``)."""
        with self._cond:
            self.generation += new_generation
            self._running = True
            self._cond.notify_all()

    def pause(self, timeout: float = 120.0) -> None:
        """Stops new calls and waits until the ones in progress ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._running = False
            while self._busy and time.monotonic() < deadline:
                self._cond.wait(0.1)
            if self._busy:
                raise RuntimeError(f"{self._busy} calls still running after {timeout:.0f} s")

    def stop(self) -> None:
        """Ends the phones' loops."""
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


class Phone(threading.Thread):
    """One phone: uploads new photos, deletes acknowledged ones, retries in-flight uploads."""

    def __init__(self, index: int, address: str, config: ClientConfig, bundle: FamilyBundle,
                 ledger: Ledger, gate: Gate, seed: int, large_fraction: float) -> None:
        super().__init__(name=f"phone-{index}", daemon=True)
        self.address = address
        self.config = config
        self.client = self._connect(bundle)
        self.generation = 0
        self.bundle = bundle
        self.ledger = ledger
        self.gate = gate
        self.rng = random.Random(seed)
        self.large_fraction = large_fraction
        self.fingerprint = bundle.label_key.fingerprint()
        self.error: BaseException | None = None

    def _connect(self, bundle: FamilyBundle) -> PrivfaceClient:
        # A new channel after each restart: an old one may sit in gRPC's reconnect backoff.
        return PrivfaceClient(self.address, Credentials(bundle.family_id, bundle.access_token),
                              config=self.config)

    def run(self) -> None:
        try:
            while self.gate.enter():
                try:
                    if self.generation != self.gate.generation:
                        self.client.close()
                        self.client = self._connect(self.bundle)
                        self.generation = self.gate.generation
                    self.step()
                finally:
                    self.gate.leave()
        except BaseException as exc:  # noqa: BLE001 - reported by the controller
            self.error = exc
        finally:
            self.client.close()

    def step(self) -> None:
        """One operation: 60 % upload, 30 % delete, 10 % retry of an in-flight upload."""
        roll = self.rng.random()
        if roll < 0.3 and self._delete():
            return
        if roll > 0.9 and self._retry():
            return
        self._upload()

    def _size(self) -> int:
        if self.rng.random() < self.large_fraction:
            return self.rng.randint(1 << 20, 3 << 20)  # several 1 MiB chunks
        return self.rng.randint(1, 64 << 10)

    def _upload(self) -> None:
        photo_id = secrets.token_hex(16)
        plain = self.rng.randbytes(self._size())
        blob = photo_crypto.encrypt_photo(self.bundle.master_key, self.bundle.family_id,
                                          photo_id, plain)
        photo = Photo(photo_id, hashlib.sha256(plain).digest(), blob)
        with self.ledger.lock:
            self.ledger.photos[photo_id] = photo
            self.ledger.counts["uploads_attempted"] += 1
        self._send(photo)

    def _send(self, photo: Photo) -> bool:
        labels_ct = pipeline.encrypt_labels(self.bundle, [0])
        try:
            already = self.client.backup_photo(photo.photo_id, photo.blob, labels_ct,
                                               self.fingerprint)
        except Exception:  # noqa: BLE001 - the server went away: the outcome is unknown
            with self.ledger.lock:
                photo.state = "unknown"
                self.ledger.counts["uploads_in_flight"] += 1
            return False
        with self.ledger.lock:
            photo.state = "acked"
            if not photo.acked_upload:
                photo.acked_upload = True
                self.ledger.counts["uploads_acked"] += 1
            if already:
                self.ledger.counts["retries_already_stored"] += 1
        return already

    def _pick(self, state: str, new_state: str) -> Photo | None:
        with self.ledger.lock:
            candidates = [p for p in self.ledger.photos.values() if p.state == state]
            if not candidates:
                return None
            photo = self.rng.choice(candidates)
            photo.state = new_state
            return photo

    def _retry(self) -> bool:
        photo = self._pick("absent", "sending")
        if photo is None:
            return False
        self.ledger.count("retries")
        self._send(photo)
        return True

    def _delete(self) -> bool:
        photo = self._pick("acked", "deleting")
        if photo is None:
            return False
        self.ledger.count("deletes_attempted")
        try:
            self.client.delete_photo(photo.photo_id)
        except errors.NotFoundError:
            with self.ledger.lock:
                photo.state = "deleted"
                self.ledger.problems.append(f"LOST: acknowledged photo {photo.photo_id} was "
                                            "not found when deleting it")
            return True
        except Exception:  # noqa: BLE001 - the server went away: the outcome is unknown
            with self.ledger.lock:
                photo.state = "delete-unknown"
                self.ledger.counts["deletes_in_flight"] += 1
            return True
        with self.ledger.lock:
            photo.state = "deleted"
            photo.acked_delete = photo.deleted_unverified = True
            self.ledger.counts["deletes_acked"] += 1
        return True


# -- checking --------------------------------------------------------------------------------


def verify(client: PrivfaceClient, bundle: FamilyBundle, ledger: Ledger, full: bool) -> int:
    """Checks what the server shows against the ledger (phones paused); settles in-flight
    operations; appends LOST/... problems to the ledger. Downloads and decrypts every
    acknowledged photo not verified yet (``full``: every present photo). Returns the number
    of photos downloaded."""
    listed = set(client.list_photos())
    found, _ = pipeline.search_photos(client, bundle, [0], labels.MatchMode.ALL)
    fetched = 0
    with ledger.lock:
        photos = list(ledger.photos.values())
    if set(found) != listed:
        ledger.problems.append(f"SEARCH: search finds {len(set(found) - listed)} photos not "
                               f"listed and misses {len(listed - set(found))} listed ones")
    unknown_ids = listed - {p.photo_id for p in photos}
    if unknown_ids:
        ledger.problems.append(f"GHOST: {len(unknown_ids)} listed photos no phone uploaded")
    for photo in photos:
        present = photo.photo_id in listed
        if photo.state == "unknown":  # an upload cut by the kill: absent, or complete
            if present:
                photo.state = "acked"
                ledger.count("in_flight_uploads_present")
            else:
                photo.state = "absent"  # a phone retries it later
                ledger.count("in_flight_uploads_absent")
                continue
        elif photo.state == "delete-unknown":
            if present:
                photo.state = "acked"
                ledger.count("in_flight_deletes_undone")
            else:
                photo.state = "deleted"
                ledger.count("in_flight_deletes_done")
                if photo.acked_upload and not photo.verified:
                    ledger.count("uploads_deleted_before_a_check")
                continue
        if photo.state == "acked":
            if not present:
                ledger.problems.append(f"LOST: acknowledged upload {photo.photo_id} is missing")
                photo.state = "lost"
                continue
            if full or not photo.verified:
                fetched += 1
                problem = _content_problem(client, bundle, photo)
                if problem:
                    ledger.problems.append(f"LOST: acknowledged upload {photo.photo_id} "
                                           f"{problem}")
                    photo.state = "lost"
                elif not photo.verified:
                    photo.verified = True
                    if photo.acked_upload:
                        ledger.count("uploads_verified")
        elif photo.state == "deleted" and photo.acked_delete:
            if present:
                ledger.problems.append(f"LOST: acknowledged delete of {photo.photo_id} undone")
                photo.state = "lost"
            elif photo.deleted_unverified:
                photo.deleted_unverified = False
                if not photo.verified and photo.acked_upload:
                    ledger.count("uploads_deleted_before_a_check")
                ledger.count("deletes_verified")
    return fetched


def _content_problem(client: PrivfaceClient, bundle: FamilyBundle, photo: Photo) -> str:
    try:
        blob = client.fetch_photo(photo.photo_id)
        plain = photo_crypto.decrypt_photo(bundle.master_key, bundle.family_id,
                                           photo.photo_id, blob)
    except Exception as exc:  # noqa: BLE001 - any failure to read it back is the finding
        return f"cannot be read back: {type(exc).__name__}: {exc}"
    if hashlib.sha256(plain).digest() != photo.plain_sha256:
        return "decrypts to other bytes"
    return ""


def store_problems(report: StoreReport) -> list[str]:
    """The store checker's findings as ledger problems."""
    return [f"STORE: {p}" for p in report.problems()]


# -- the faulty server (negative control) ----------------------------------------------------


def faulty_server_main() -> int:
    """privface-server with ``Store.put_photo`` acknowledging before the row commits (the
    commit runs FAULTY_ACK_DELAY seconds later in another thread): a kill in between loses
    acknowledged uploads, which the checks must report."""
    from server import __main__ as server_main
    from server.storage import Store

    real_put = Store.put_photo

    def put_photo_early(self: Store, family_id: str, photo_id: str, *args: Any,
                        **kwargs: Any) -> tuple[int, bool]:
        def later() -> None:
            time.sleep(FAULTY_ACK_DELAY)
            real_put(self, family_id, photo_id, *args, **kwargs)
        threading.Thread(target=later, daemon=True).start()
        return 0, True

    Store.put_photo = put_photo_early  # type: ignore[method-assign]
    return server_main.main(sys.argv[1:])


# -- the run ---------------------------------------------------------------------------------


@dataclass
class CrashRun:
    """One crash test: a server process, a family, the phones, the ledger."""

    work: Path
    phones: int = 4
    seed: int = 0
    faulty_ack: bool = False
    large_fraction: float = 0.1
    min_delay: float = 0.05
    max_delay: float = 1.2
    log: Callable[[str], None] = lambda _msg: None
    ledger: Ledger = field(default_factory=Ledger)
    restart_seconds: list[float] = field(default_factory=list)
    store_checks: int = 0
    integrity_ok: int = 0
    fetched: int = 0
    kills: int = 0

    def __post_init__(self) -> None:
        certs = write_dev_certs(self.work / "tls")
        command = (("-c", "import sys; from bench.crash_test import faulty_server_main; "
                    "sys.exit(faulty_server_main())") if self.faulty_ack else ("-m", "server"))
        self.server = ServerProcess(self.work / "data", certs.server_cert, certs.server_key,
                                    certs.ca, self.work / "server.log",
                                    flags=["--grace-seconds", "1"], command=command)
        self.config = ClientConfig(tls_ca=certs.ca, timeout=60.0, upload_timeout=120.0)
        self.gate = Gate()
        self.rng = random.Random(self.seed)
        self.server.start()
        self.client = PrivfaceClient(self.server.address, config=self.config)
        self.bundle = create_family(self.client)
        self.bundle.add_member("Mum")
        self.threads = [Phone(i, self.server.address, self.config, self.bundle, self.ledger,
                              self.gate, self.seed * 100 + i, self.large_fraction)
                        for i in range(self.phones)]
        for thread in self.threads:
            thread.start()

    def check(self, full: bool = False) -> None:
        """The checks of one quiet moment (phones paused, server up). Blob files are hashed
        against their rows in the ``full`` check (after a restart: sizes; each new photo is
        downloaded and decrypted by verify)."""
        report = check_store(self.server.data_dir, hash_blobs=full)
        self.store_checks += 1
        self.integrity_ok += report.integrity == "ok"
        self.ledger.problems.extend(store_problems(report))
        self.fetched += verify(self.client, self.bundle, self.ledger, full)

    def kill_and_restart(self) -> None:
        """Lets the phones run for a random moment, kills the server, restarts it, checks."""
        self.gate.run(new_generation=True)
        time.sleep(self.rng.uniform(self.min_delay, self.max_delay))
        self.server.kill()
        self.kills += 1
        self.gate.pause()
        start = time.perf_counter()
        self.server.start()
        self.restart_seconds.append(time.perf_counter() - start)
        self.client.close()
        self.client = PrivfaceClient(self.server.address, Credentials(
            self.bundle.family_id, self.bundle.access_token), config=self.config)
        self.check()

    def run(self, kills: int) -> None:
        """``kills`` kill-restart-check rounds, then a full check."""
        for i in range(kills):
            self.kill_and_restart()
            for thread in self.threads:
                if thread.error is not None:
                    raise RuntimeError(f"{thread.name} failed") from thread.error
            if (i + 1) % 10 == 0 or i + 1 == kills:
                c = self.ledger.counts
                self.log(f"{i + 1}/{kills} kills: {c['uploads_acked']} uploads and "
                         f"{c['deletes_acked']} deletes acknowledged, "
                         f"{len(self.ledger.problems)} problems")
        self.gate.pause()
        self.check(full=True)

    def close(self) -> None:
        """Stops the phones and the server."""
        self.gate.stop()
        for thread in self.threads:
            thread.join(30)
        self.client.close()
        self.server.stop()

    def figures(self) -> dict[str, Any]:
        """The results as JSON values."""
        swept = [int(n) for n in ORPHANS_RE.findall(self.server.log_text())]
        return {
            "kills": self.kills, "phones": self.phones, "faulty_ack": self.faulty_ack,
            **self.ledger.counts, "lost": self.ledger.lost(),
            "problems": len(self.ledger.problems), "problem_examples": self.ledger.problems[:20],
            "orphans_swept": sum(swept), "restarts_that_swept": len(swept),
            "store_checks": self.store_checks, "integrity_check_ok": self.integrity_ok,
            "photos_downloaded_and_decrypted": self.fetched,
            "photos_at_end": sum(1 for p in self.ledger.photos.values() if p.state == "acked"),
            "restart_seconds_median": round(statistics.median(self.restart_seconds), 2)
            if self.restart_seconds else 0.0,
        }


def print_report(figures: dict[str, Any]) -> None:
    """The table the README shows."""
    rows = [
        ["kills (SIGKILL during uploads and deletes)", figures["kills"]],
        ["uploads acknowledged", figures["uploads_acked"]],
        ["  verified after a restart (present, decrypted byte-identical)",
         figures["uploads_verified"]],
        ["  deleted (acknowledged) before their first check", figures[
            "uploads_deleted_before_a_check"]],
        ["deletes acknowledged", figures["deletes_acked"]],
        ["  verified after a restart (still deleted)", figures["deletes_verified"]],
        ["uploads in flight at a kill: complete / absent after restart",
         f"{figures['in_flight_uploads_present']} / {figures['in_flight_uploads_absent']}"],
        ["deletes in flight at a kill: done / not done",
         f"{figures['in_flight_deletes_done']} / {figures['in_flight_deletes_undone']}"],
        ["retries of in-flight uploads (already stored)",
         f"{figures['retries']} ({figures['retries_already_stored']})"],
        ["lost (acknowledged but missing, corrupt or undone)", figures["lost"]],
        ["orphan files swept at restart (restarts that swept)",
         f"{figures['orphans_swept']} ({figures['restarts_that_swept']})"],
        ["store checks: integrity_check ok / problems",
         f"{figures['integrity_check_ok']}/{figures['store_checks']} / {figures['problems']}"],
        ["photos downloaded and decrypted by the checks",
         figures["photos_downloaded_and_decrypted"]],
        ["restart to healthy, median s", figures["restart_seconds_median"]],
    ]
    print_table(["crash test", "figure"], rows)
    for problem in figures["problem_examples"]:
        print("  " + problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--phones", type=int, default=4, help="concurrent phones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large-fraction", type=float, default=0.1,
                        help="share of uploads of 1-3 MiB (several chunks)")
    parser.add_argument("--faulty-ack", action="store_true",
                        help="negative control: a server that acknowledges before the row "
                             "commits (losses must be reported)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temp dir)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="privface-crash-") as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        run = CrashRun(work, phones=args.phones, seed=args.seed, faulty_ack=args.faulty_ack,
                       large_fraction=args.large_fraction,
                       log=lambda msg: print(msg, flush=True))
        try:
            run.run(args.kills)
        finally:
            run.close()
        figures = dict(run.figures(), seconds=round(time.perf_counter() - started, 1))
    print_report(figures)
    write_json(args.json, figures)
    clean = figures["lost"] == 0 and figures["problems"] == 0
    return 0 if clean != args.faulty_ack else 1


if __name__ == "__main__":
    sys.exit(main())
