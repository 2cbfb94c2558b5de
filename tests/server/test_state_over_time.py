"""State over time: what a family does after its first search or match must show in the
next one (the server keeps its label index and prepared gallery in memory)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.rpc import PrivfaceClient
from common import labels
from common.errors import MalformedInputError, NotFoundError
from server.label_index import MAX_TOP_N, FamilyLabelIndex, LabelSearch
from tests.conftest import connect, enroll_embeddings
from tests.server.conftest import StoreFactory

ALL, ANY, RANKED = labels.MatchMode.ALL, labels.MatchMode.ANY, labels.MatchMode.RANKED


def _photo(tag: str) -> bytes:
    """A small decodable PNG, distinct per tag."""
    import cv2
    seed = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "little")
    ok, png = cv2.imencode(".png", np.random.default_rng(seed).integers(
        0, 255, size=(24, 32, 3), dtype=np.uint8))
    assert ok
    return bytes(png.tobytes())


def search(client: PrivfaceClient, bundle: FamilyBundle, names: list[str],
           mode: labels.MatchMode = ALL, top_n: int = 0) -> list[str]:
    ids, _ = pipeline.search_photos(client, bundle, [bundle.slot_of(n) for n in names], mode,
                                    top_n)
    return ids


def backup(client: PrivfaceClient, bundle: FamilyBundle, tag: str, names: list[str]) -> str:
    return pipeline.backup_photo(client, bundle, _photo(tag),
                                 [bundle.slot_of(n) for n in names]).photo_id


def test_search_follows_backups_made_after_the_first_search(family, address) -> None:
    client, bundle = family
    first = backup(client, bundle, "first", ["Mum"])
    assert search(client, bundle, ["Mum"]) == [first]  # loads the family's label index
    assert search(client, bundle, ["Tom"]) == []
    second = backup(client, bundle, "second", ["Mum", "Tom"])
    assert search(client, bundle, ["Mum"]) == [second, first]  # newest first
    assert search(client, bundle, ["Mum", "Tom"]) == [second]
    assert search(client, bundle, ["Tom"]) == [second]
    third = backup(client, bundle, "third", ["Tom", "Dad"])
    assert set(search(client, bundle, ["Mum", "Dad"], ANY)) == {first, second, third}
    assert search(client, bundle, ["Mum", "Tom", "Dad"], RANKED, 1) in ([second], [third])
    # Another connection (another phone of the family) sees the same state.
    with connect(address, bundle) as other:
        assert search(other, bundle, ["Tom"]) == [third, second]
        fourth = backup(other, bundle, "fourth", ["Tom"])
    assert search(client, bundle, ["Tom"]) == [fourth, third, second]


def test_search_follows_deletes_made_after_the_first_search(family) -> None:
    client, bundle = family
    ids = [backup(client, bundle, f"p{i}", ["Mum", "Tom"] if i % 2 else ["Mum"])
           for i in range(5)]
    assert search(client, bundle, ["Mum"]) == ids[::-1]
    client.delete_photo(ids[1])
    client.delete_photo(ids[4])
    assert search(client, bundle, ["Mum"]) == [ids[3], ids[2], ids[0]]
    assert search(client, bundle, ["Mum", "Tom"]) == [ids[3]]
    ranked = search(client, bundle, ["Mum", "Tom"], RANKED, 5)  # any of them, best first
    assert ranked[0] == ids[3] and sorted(ranked[1:]) == sorted([ids[2], ids[0]])
    with pytest.raises(NotFoundError):
        client.fetch_photo(ids[1])
    # The same photo backed up again comes back, as the newest.
    again = backup(client, bundle, "p1", ["Mum", "Tom"])
    assert again == ids[1]
    assert search(client, bundle, ["Mum", "Tom"]) == [ids[1], ids[3]]
    for photo_id in client.list_photos():
        client.delete_photo(photo_id)
    assert search(client, bundle, ["Mum"]) == []
    assert client.list_photos() == []


def test_label_index_compaction_keeps_every_result() -> None:
    """Deletes leave tombstones, compacted once more than half the rows are dead; results
    and their order must not change across a compaction, nor with rows added after it."""
    index = FamilyLabelIndex(2)
    hit, miss = np.array([1.0, 0.0]).tobytes(), np.array([-1.0, 0.0]).tobytes()
    rows = [(f"{i:032x}", hit if i % 3 else miss) for i in range(1500)]
    index.add_many(rows)
    query = np.array([1.0, 0.0])
    expected = [pid for pid, blob in rows if blob == hit][::-1]
    assert index.search(query, ALL, 0).photo_ids == expected
    removed = {pid for pid, _ in rows[:1000]}
    for pid in sorted(removed):
        index.remove(pid)
    assert len(index) == 500
    expected = [pid for pid in expected if pid not in removed]
    assert index.search(query, ALL, 0).photo_ids == expected
    index.add_many([(f"{i:032x}", hit) for i in range(5000, 5003)] + [(rows[-1][0], miss)])
    later = [f"{i:032x}" for i in range(5002, 4999, -1)]
    assert index.search(query, ALL, 0).photo_ids == later + expected
    oldest_first = (later + expected)[::-1]  # equal scores: ranked keeps upload order
    assert index.search(query, RANKED, 2).photo_ids == oldest_first[:2]
    index.remove(later[0])
    assert index.search(query, ALL, 0).photo_ids == later[1:] + expected


def _members(rng: np.random.Generator, names: list[str], per: int) -> dict[str, np.ndarray]:
    """Random unit embeddings, ``per`` per member, far apart from other members'."""
    out = {}
    for name in names:
        centre = rng.standard_normal(128)
        centre /= np.linalg.norm(centre)
        faces_ = centre + 0.02 * rng.standard_normal((per, 128))
        out[name] = faces_ / np.linalg.norm(faces_, axis=1, keepdims=True)
    return out


def test_member_removal_then_identify_then_re_enrolment(family) -> None:
    """identify -> remove a member -> identify -> re-pack -> identify -> enrol again:
    each match sees the gallery as it is now (the server caches prepared blocks)."""
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    people = _members(np.random.default_rng(11), ["Ann", "Ben", "Cat"], 4)
    for name, emb in people.items():
        enroll_embeddings(client, bundle, name, emb[:3])
    probes = np.vstack([people[n][3] for n in ("Ann", "Ben", "Cat")])

    def names() -> list[str | None]:
        return [m.name for m in faces.identify(client, bundle, probes)]
    assert names() == ["Ann", "Ben", "Cat"]
    client.remove_gallery_slot(bundle.remove_member("Ben"))
    assert names() == ["Ann", None, "Cat"]
    assert faces.compact(client, bundle) == (9, 6)
    assert names() == ["Ann", None, "Cat"]
    enroll_embeddings(client, bundle, "Ben", people["Ben"][:1])
    assert names() == ["Ann", "Ben", "Cat"]
    client.remove_gallery_slot(bundle.remove_member("Ann"))
    client.remove_gallery_slot(bundle.remove_member("Cat"))
    assert names() == [None, "Ben", None]
    assert faces.gallery_counts(client) == {bundle.slot_of("Ben"): 1}


def _rows(vectors: dict[str, list[float]]) -> list[tuple[str, bytes]]:
    return [(pid, np.array(v, "<f8").tobytes()) for pid, v in vectors.items()]


def test_label_index_keeps_strictly_positive_scores_newest_first() -> None:
    """The threshold is folded into the vectors: a score of exactly 0 is no match."""
    index = FamilyLabelIndex(2)
    index.add_many(_rows({"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [2.0, 1.0], "d": [-1.0, 0.0]}))
    assert index.search(np.array([1.0, 0.0]), ALL, 0).photo_ids == ["c", "a"]
    assert index.search(np.array([1.0, 0.0]), RANKED, 10).photo_ids == ["c", "a"]
    assert index.search(np.array([1.0, 0.0]), RANKED, 1).photo_ids == ["c"]


def test_ranked_ties_keep_upload_order_in_large_results() -> None:
    """Hundreds of equal scores (an unstable sort reorders them) stay oldest first, after
    every higher score."""
    index = FamilyLabelIndex(1)
    scores = {f"{i:04d}": [1.0 + (i % 3 == 0)] for i in range(300)}
    index.add_many(_rows(scores))
    expected = ([pid for pid, s in scores.items() if s[0] == 2.0]
                + [pid for pid, s in scores.items() if s[0] == 1.0])
    assert index.search(np.array([1.0]), RANKED, 300).photo_ids == expected


def test_label_index_grows_past_its_first_block_and_forgets_unknown_ids() -> None:
    index = FamilyLabelIndex(1)
    for start in range(0, 2100, 700):
        index.add_many(_rows({f"{i:05d}": [1.0] for i in range(start, start + 700)}))
    assert len(index) == 2100
    index.remove("never-added")
    index.remove("00000")
    index.remove("00000")
    found = index.search(np.array([1.0]), ALL, 0).photo_ids
    assert len(found) == 2099 and found[0] == "02099" and found[-1] == "00001"


def test_label_search_follows_every_servers_changes(make_store: StoreFactory) -> None:
    store = make_store()
    fam_a, token_a = store.create_family(b"fp", 1)
    fam_b, token_b = store.create_family(b"fp", 1)
    store.bulk_insert_labels(fam_a, _rows({"a1": [1.0]}))
    store.bulk_insert_labels(fam_b, _rows({"b1": [1.0]}))
    search = LabelSearch(store)
    query = np.array([1.0], "<f8").tobytes()
    tokens = {fam_a: token_a, fam_b: token_b}

    def found(family_id: str, mode: labels.MatchMode = ALL, top_n: int = 0) -> list[str]:
        family = store.authenticate(family_id, tokens[family_id])  # reads the versions
        return search.search(family, b"fp", query, mode, top_n).photo_ids

    assert (found(fam_a), found(fam_b)) == (["a1"], ["b1"])
    version = store.authenticate(fam_a, token_a).label_version
    assert search.index(fam_a, 1, version) is search.index(fam_a, 1, version)  # kept
    other = make_store()  # another server on the same store
    other.bulk_insert_labels(fam_a, _rows({"a2": [1.0]}))
    assert found(fam_a) == ["a2", "a1"]  # seen on the next call
    key = other.new_photo_key(fam_b, "b2")
    other.blobs.put(key, b"blob")
    other.put_photo(fam_b, "b2", key, 4, bytes(32), np.array([1.0], "<f8").tobytes(), None)
    other.delete_photo(fam_b, "b1")
    assert found(fam_b) == ["b2"]
    other.delete_photo(fam_b, "b2")  # deleted and backed up again: back, newest
    key = other.new_photo_key(fam_b, "b2")
    other.blobs.put(key, b"blob")
    other.put_photo(fam_b, "b2", key, 4, bytes(32), np.array([2.0], "<f8").tobytes(), None)
    assert found(fam_b) == ["b2"]
    search.forget(fam_a)
    search.forget("fam_never_seen")
    assert found(fam_a) == ["a2", "a1"] and found(fam_b) == ["b2"]
    assert found(fam_a, RANKED, MAX_TOP_N) == ["a1", "a2"]
    family_a = store.authenticate(fam_a, token_a)
    for top_n in (0, MAX_TOP_N + 1):
        with pytest.raises(MalformedInputError, match="top_n"):
            search.search(family_a, b"fp", query, RANKED, top_n)
