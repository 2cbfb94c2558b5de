"""Replicas for the load test (bench/load_test.py, issue 9 part 6): N privface-server
processes on different ports sharing one store and one blob store, one of them killed with
SIGKILL in the middle of the run and restarted, and the checks after the run.

* ``ReplicaSet``: the processes (``bench.server_process.ServerProcess``, TLS with one
  development certificate, the same ``--store``/``--blobs``); ``kill_and_restart`` is the
  fault, timed against the load's clock; CPU seconds and memory per replica across
  restarts.
* ``fresh_database``: a new PostgreSQL database next to a given URL (one per run), so that
  every run starts from an empty store.
* ``verify_replicas``: after the load, with the phones stopped, every family seen from
  EACH replica alone (a client addressing that replica only): the photo list, every photo
  and thumbnail fetched (SHA-256 of the encrypted bytes), the family's counts, the gallery
  layout, the same encrypted searches and face matches. Then (a) every acknowledged
  backup (photo id and the SHA-256 of the encrypted blob the phone sent) is listed and
  fetched byte-identical from every replica: ``lost`` counts those that are not; (c) the
  views of all replicas are identical (search results, ranked order included; match
  distances within CKKS noise).
* ``windows_report``: every call of the load by when its RPC started, before / during /
  after the kill (during: from the SIGKILL until the restarted replica answered its health
  check), errors by status per RPC in each window, and which failed calls were in flight
  at the moment of the kill (the only ones allowed to fail: the client retries the
  idempotent ones on UNAVAILABLE, on the replica still up).

The phones balance over one comma-separated server list (gRPC round-robin) and cannot tell
which replica served a call, so "in flight on the killed replica" is checked as "in flight
anywhere at the kill", a superset.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/, client/, ... importable
    sys.path.insert(0, str(ROOT))

from bench.server_process import ServerProcess  # noqa: E402
from client.config import ClientConfig  # noqa: E402
from client.pipeline import photos as pipeline  # noqa: E402
from client.rpc import PrivfaceClient  # noqa: E402
from common import ckks, labels  # noqa: E402
from server.tls import write_dev_certs  # noqa: E402

if TYPE_CHECKING:
    from bench.load_test import LoadFamily

MATCH_TOLERANCE = 1e-3  # match distances seen from two replicas may differ by CKKS noise only


def redact(url: str) -> str:
    """A store URL without its password (for tables, logs and JSON)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def store_kind(store: str) -> str:
    """sqlite or postgresql (the default store is SQLite)."""
    return "postgresql" if store.startswith(("postgresql:", "postgres:")) else "sqlite"


def _server_env() -> dict[str, str]:
    """The caller's environment without PRIVFACE_* (the S3 endpoint settings excepted)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PRIVFACE_") or k.startswith("PRIVFACE_S3_")}


def migrate(store: str) -> str:
    """``privface-server migrate --store STORE``; its one-line report."""
    run = subprocess.run([sys.executable, "-m", "server", "migrate", "--store", store],
                         cwd=ROOT, env=_server_env(), capture_output=True, text=True,
                         timeout=120)
    if run.returncode != 0:
        raise SystemExit(f"privface-server migrate failed ({run.returncode}):\n"
                         f"{run.stderr[-2000:]}")
    return run.stdout.strip()


def fresh_database(base_url: str, name: str) -> str:
    """Creates database ``name`` on the PostgreSQL server of ``base_url`` (dropped first if
    it exists); its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urllib.parse.urlsplit(base_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def drop_database(base_url: str, name: str) -> None:
    """Drops database ``name`` (after a run); errors are ignored."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    except psycopg.Error:
        pass


def postgres_sizes(url: str) -> dict[str, Any]:
    """What the store holds in PostgreSQL: per table its rows and bytes on disk (table,
    indexes and TOAST), and the whole database's size."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_stat_user_tables ORDER BY relname").fetchall()]
        out: dict[str, Any] = {}
        for table in tables:
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(table))).fetchone()
            size = conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                                (sql.Identifier(table).as_string(conn),)).fetchone()
            out[table] = {"rows": int(rows[0]) if rows else 0,
                          "bytes": int(size[0]) if size else 0}
        db = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return {"tables": out, "database_bytes": int(db[0]) if db else 0}


def tree_bytes(path: Path) -> tuple[int, int]:
    """(files, bytes) under a directory."""
    files = total = 0
    for p in path.rglob("*"):
        if p.is_file():
            files += 1
            total += p.stat().st_size
    return files, total


def blob_kinds(path: Path) -> dict[str, dict[str, int]]:
    """A directory blob store's files by kind (server/storage.py's names): photos
    (``*.blob``), CKKS public contexts (``context-*.bin``), detectors (``*.detector``)."""
    out: dict[str, dict[str, int]] = {}
    for p in path.rglob("*"):
        if not p.is_file():
            continue
        kind = ("photo" if p.name.endswith(".blob") else
                "context" if p.name.startswith("context-") else
                "detector" if p.name.endswith(".detector") else "other")
        entry = out.setdefault(kind, {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += p.stat().st_size
    return out


# -- the replicas --------------------------------------------------------------------------


@dataclass(frozen=True)
class KillRecord:
    """When (seconds from the start of the load) the replica was killed and answered again."""

    replica: int
    address: str
    killed_at: float
    back_at: float
    in_flight: int = 0  # calls in flight (anywhere) at the kill, filled in later


class ReplicaSet:
    """``n`` privface-server processes on 127.0.0.1 sharing ``store`` and ``blobs``.

    Default storage: one process keeps the embedded default (SQLite and files in its data
    directory); several share ``sqlite:WORK/shared/privface.sqlite3`` (SQLite works across
    processes) unless told otherwise, and blobs in ``file:WORK/shared/blobs`` unless a
    ``blobs`` URL is given. An explicit store is migrated once before the start."""

    def __init__(self, work: Path, n: int, *, insecure: bool = False, store: str = "",
                 blobs: str = "", flags: Sequence[str] = (), vendor_token: str = "") -> None:
        if n < 1:
            raise ValueError("at least one replica")
        shared = work / "shared"
        if n > 1 and not store:
            store = f"sqlite:{shared / 'privface.sqlite3'}"
        if store and not blobs:
            blobs = f"file:{shared / 'blobs'}"
        if store.startswith("sqlite:") or blobs.startswith("file:"):
            shared.mkdir(parents=True, exist_ok=True)
        self.store, self.blobs = store, blobs
        self.work = work
        certs = None if insecure else write_dev_certs(work / "tls")
        self.tls_ca = certs.ca if certs else None
        self.vendor_token = vendor_token
        env = {**_server_env(), "PRIVFACE_VENDOR_TOKEN": vendor_token}
        self.servers = [
            ServerProcess(work / f"data-{i}", certs.server_cert if certs else None,
                          certs.server_key if certs else None, self.tls_ca,
                          work / f"replica-{i}.log", flags=flags, env=env, store=store,
                          blobs=blobs)
            for i in range(n)]
        self._cpu_before: list[float] = [0.0] * n  # CPU of earlier (killed) incarnations
        self.kills: list[KillRecord] = []

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    @property
    def server_list(self) -> str:
        """The comma-separated list the phones balance over."""
        return ",".join(self.addresses)

    def start(self) -> None:
        if self.store:
            migrate(self.store)
        for s in self.servers:
            s.start()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def _cpu_now(self, i: int) -> float:
        s = self.servers[i]
        if s.process is None or not s.alive():
            return 0.0
        try:
            t = psutil.Process(s.process.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def cpu_seconds(self) -> list[float]:
        """CPU seconds each replica used so far (all its incarnations)."""
        return [before + self._cpu_now(i) for i, before in enumerate(self._cpu_before)]

    def rss_mb(self) -> list[float | None]:
        """Resident memory of each replica now (None if not running)."""
        out: list[float | None] = []
        for s in self.servers:
            try:
                out.append(round(psutil.Process(s.process.pid).memory_info().rss / 2**20, 1)
                           if s.process is not None and s.alive() else None)
            except psutil.Error:
                out.append(None)
        return out

    def kill(self, i: int) -> None:
        """SIGKILL replica ``i`` (its CPU time so far is kept)."""
        self._cpu_before[i] += self._cpu_now(i)
        self.servers[i].kill()

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Starts replica ``i`` again on its port; returns once it answers SERVING."""
        self.servers[i].start(timeout)

    def kill_and_restart(self, i: int, at: float, pause: float, t0: float) -> KillRecord:
        """At ``t0 + at`` (perf_counter) SIGKILLs replica ``i``, ``pause`` s later starts it
        again; when it answered its health check. Blocks (under gevent: yields)."""
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        killed = time.perf_counter() - t0
        self.kill(i)
        print(f"[kill] replica {i} ({self.servers[i].address}) SIGKILLed at {killed:.1f} s",
              file=sys.stderr, flush=True)
        time.sleep(pause)
        self.restart(i)
        back = time.perf_counter() - t0
        print(f"[kill] replica {i} restarted, serving again at {back:.1f} s", file=sys.stderr,
              flush=True)
        record = KillRecord(i, self.servers[i].address, killed, back)
        self.kills.append(record)
        return record


# -- the timeline of calls -----------------------------------------------------------------


@dataclass(frozen=True)
class CallEvent:
    """One call of the load: its RPC, when the RPC started and the call ended (seconds
    from the start of the load), and its status (OK or the error's)."""

    rpc: str
    start: float
    end: float
    status: str


def windows_report(events: Sequence[CallEvent], kill: KillRecord | None) -> dict[str, Any]:
    """Calls and errors by status per RPC before, during and after the kill; the failed
    calls split into those in flight at the kill (allowed) and the others (not allowed)."""
    if kill is None:
        bounds = {"all": (float("-inf"), float("inf"))}
    else:
        bounds = {"before": (float("-inf"), kill.killed_at),
                  "during": (kill.killed_at, kill.back_at),
                  "after": (kill.back_at, float("inf"))}
    calls: dict[str, Counter[str]] = defaultdict(Counter)
    errors: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    in_flight: Counter[str] = Counter()
    failed_in_flight: dict[str, Counter[str]] = defaultdict(Counter)
    failed_other: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        window = next(w for w, (lo, hi) in bounds.items() if lo <= e.start < hi)
        calls[window][e.rpc] += 1
        flying = kill is not None and e.start < kill.killed_at <= e.end
        if flying:
            in_flight[e.rpc] += 1
        if e.status != "OK":
            errors[window][e.rpc][e.status] += 1
            (failed_in_flight if flying else failed_other)[e.rpc][e.status] += 1

    def plain(d: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in sorted(d.items())}
    return {
        "windows": {w: {"from_s": None if lo == float("-inf") else round(lo, 2),
                        "to_s": None if hi == float("inf") else round(hi, 2),
                        "calls": dict(calls[w]), "errors": plain(errors[w])}
                    for w, (lo, hi) in bounds.items()},
        "in_flight_at_kill": dict(in_flight),
        "failed_in_flight": plain(failed_in_flight),
        "failed_not_in_flight": plain(failed_other),
        "failed_not_in_flight_total": sum(sum(c.values()) for c in failed_other.values()),
    }


# -- after the run: each replica alone -----------------------------------------------------


@dataclass
class FamilyView:
    """One family as one replica shows it."""

    photo_ids: list[str] = field(default_factory=list)  # as listed (newest first)
    photo_sha256: dict[str, str] = field(default_factory=dict)  # encrypted blob, as fetched
    thumbnail_sha256: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)  # GetFamily
    layout: dict[int, list[int]] = field(default_factory=dict)
    searches: dict[str, list[str]] = field(default_factory=dict)
    matches: list[tuple[int | None, list[float]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # calls that failed


@dataclass(frozen=True)
class FixedQuery:
    """An encrypted search sent unchanged to every replica."""

    name: str
    ciphertext: bytes
    mode: labels.MatchMode
    top_n: int


def fixed_queries(family: LoadFamily) -> list[FixedQuery]:
    """Each member alone (all-of), the first two together (all-of and any-of), every member
    ranked (top 10): encrypted once, sent to each replica."""
    slots = sorted(family.members.values())
    wanted: list[tuple[str, list[int], labels.MatchMode, int]] = [
        (f"all {s}", [s], labels.MatchMode.ALL, 0) for s in slots]
    if len(slots) > 1:
        wanted += [(f"all {slots[:2]}", slots[:2], labels.MatchMode.ALL, 0),
                   (f"any {slots[:2]}", slots[:2], labels.MatchMode.ANY, 0)]
    wanted.append((f"top10 {slots}", slots, labels.MatchMode.RANKED, 10))
    return [FixedQuery(name, pipeline.encrypt_query(family.bundle, s, mode), mode, top)
            for name, s, mode, top in wanted]


def view_family(address: str, config: ClientConfig, family: LoadFamily,
                queries: Sequence[FixedQuery]) -> FamilyView:
    """Everything ``address`` alone shows of ``family``."""
    view = FamilyView()
    with PrivfaceClient(address, family.credentials, config) as client:
        def attempt(what: str, fn: Any, *a: Any) -> Any:
            try:
                return fn(*a)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
                view.problems.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
                return None
        view.photo_ids = attempt("ListPhotos", client.list_photos) or []
        for pid in view.photo_ids:
            blob = attempt(f"FetchPhoto {pid}", client.fetch_photo, pid, False)
            if blob is not None:
                view.photo_sha256[pid] = hashlib.sha256(blob).hexdigest()
            thumb = attempt(f"FetchPhoto thumbnail {pid}", client.fetch_photo, pid, True)
            if thumb is not None:
                view.thumbnail_sha256[pid] = hashlib.sha256(thumb).hexdigest()
        summary = attempt("GetFamily", client.get_family)
        if summary is not None:
            view.counts = {"photo_count": summary.photo_count,
                           "gallery_entry_count": summary.gallery_entry_count,
                           "has_public_context": summary.has_public_context,
                           "ckks_key_id": bytes(summary.ckks_key_id).hex()}
        view.layout = attempt("GetGalleryLayout", client.gallery_layout) or {}
        fp = family.bundle.label_key.fingerprint()
        for q in queries:
            found = attempt(f"SearchPhotos {q.name}", client.search_photos, q.ciphertext, fp,
                            q.mode, q.top_n)
            if found is not None:
                ids = list(found[0])
                view.searches[q.name] = ids if q.mode is labels.MatchMode.RANKED else sorted(ids)
        for i, fq in enumerate(family.queries):
            replies = attempt(f"MatchFaces query {i}", client.match_faces, [fq.ciphertexts])
            if replies is None:
                view.matches.append((None, []))
                continue
            distances: list[float] = []
            slots: list[int | None] = []
            for reply in sorted(replies, key=lambda r: r.block):
                distances += [float(d) for d in ckks.decrypt_distances(
                    family.secret, reply.ciphertext, len(reply.position_slots))]
                slots += [s if s >= 0 else None for s in reply.position_slots]
            slot, dist = ckks.nearest(distances, slots) if distances else (None, float("inf"))
            view.matches.append((slot if dist <= ckks.TOLERANCE else None, distances))
    return view


def _differences(name: str, views: Sequence[FamilyView]) -> list[str]:
    """How the replicas' views of one family differ (empty: identical)."""
    out = []
    first = views[0]
    for r, v in enumerate(views[1:], start=1):
        for what in ("photo_ids", "photo_sha256", "thumbnail_sha256", "counts", "layout",
                     "searches"):
            a, b = getattr(first, what), getattr(v, what)
            if a != b:
                if isinstance(a, dict) and isinstance(b, dict):
                    keys = sorted({k for k in a.keys() | b.keys() if a.get(k) != b.get(k)},
                                  key=str)
                    out.append(f"{name}: {what} differ between replica 0 and {r} "
                               f"({len(keys)} keys, e.g. {keys[:3]})")
                else:
                    out.append(f"{name}: {what} differ between replica 0 and {r} "
                               f"({len(a)} vs {len(b)} items)")
        if len(first.matches) != len(v.matches):
            out.append(f"{name}: {len(first.matches)} vs {len(v.matches)} match answers")
        for q, ((s0, d0), (s1, d1)) in enumerate(zip(first.matches, v.matches, strict=False)):
            close = len(d0) == len(d1) and all(abs(x - y) <= MATCH_TOLERANCE
                                               for x, y in zip(d0, d1, strict=True))
            if s0 != s1 or not close:
                out.append(f"{name}: match query {q}: replica 0 says slot {s0}, replica {r} "
                           f"slot {s1} (distances {'close' if close else 'differ'})")
    return out


def verify_replicas(addresses: Sequence[str], families: Sequence[LoadFamily],
                    config: ClientConfig, workers: int = 8) -> dict[str, Any]:
    """Every family from each replica alone; acknowledged uploads lost; consistency."""
    start = time.perf_counter()
    queries = {f.name: fixed_queries(f) for f in families}
    jobs = [(r, f) for f in families for r in range(len(addresses))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(
            lambda job: view_family(addresses[job[0]], config, job[1], queries[job[1].name]),
            jobs))
    views: dict[str, list[FamilyView]] = defaultdict(list)
    for (_, f), view in zip(jobs, results, strict=True):
        views[f.name].append(view)
    acked = lost = 0
    lost_examples: list[str] = []
    differences: list[str] = []
    problems: list[str] = []
    for f in families:
        per_replica = views[f.name]
        for r, v in enumerate(per_replica):
            problems += [f"{f.name} on replica {r}: {p}" for p in v.problems]
        for photo_id, sha in f.acked.items():
            acked += 1
            bad = [r for r, v in enumerate(per_replica)
                   if photo_id not in v.photo_ids or v.photo_sha256.get(photo_id) != sha]
            if bad:
                lost += 1
                if len(lost_examples) < 10:
                    lost_examples.append(f"{f.name} {photo_id}: missing or different on "
                                         f"replica(s) {bad}")
        differences += _differences(f.name, per_replica)
    photos = sum(len(v[0].photo_ids) for v in views.values())
    return {"acked_uploads": acked, "lost_uploads": lost, "lost_examples": lost_examples,
            "consistent_across_replicas": not differences and not problems,
            "differences": differences[:20], "verify_problems": problems[:20],
            "verified_replicas": list(addresses), "photos_on_server": photos,
            "verify_s": round(time.perf_counter() - start, 1)}
