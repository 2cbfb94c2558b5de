"""The photo library against a real server: a folder backed up again skips what the server
already holds (no labelling, nothing sent), and the bytes a backup reports are every
message it sent, counted by the client (client/rpc.py Traffic)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from client.pipeline import library, photos
from client.pipeline.labelling import PhotoLabelling


def _photo(path: Path, seed: int, size: tuple[int, int] = (60, 80)) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))
    return path


class CountingLabeller:
    """Stands in for face labelling (no faces) and counts the photos it was asked about."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> PhotoLabelling:
        self.paths.append(Path(path))
        return PhotoLabelling([])


def test_backup_again_skips_known_photos_without_labelling(family, tmp_path: Path) -> None:
    client, bundle = family
    first = [_photo(tmp_path / f"p{i}.png", i) for i in range(2)]
    labeller = CountingLabeller()
    summary = library.backup_files(client, bundle, first, labeller)
    assert [len(summary.stored), len(summary.already)] == [2, 0]
    assert labeller.paths == first
    for item in summary.items:
        assert item.receipt is not None and item.bytes_up >= item.receipt.bytes_sent > 0
        assert item.bytes_down > 0  # the server's answer
    assert summary.bytes_sent == sum(i.bytes_up for i in summary.items)

    new = _photo(tmp_path / "p2.png", 2)
    labeller = CountingLabeller()
    again = library.backup_files(client, bundle, [*first, new], labeller)
    assert labeller.paths == [new]  # known photos are neither labelled nor uploaded
    assert [i.path for i in again.already] == first and [i.path for i in again.stored] == [new]
    for item in again.already:
        assert item.bytes_up == 0 and item.receipt is not None
        assert item.receipt.photo_id == photos.photo_id_for(bundle, item.path.read_bytes())
        assert item.receipt.thumbnail.startswith(b"\xff\xd8")  # still shown by the app
    assert sorted(client.list_photos()) == sorted(i.receipt.photo_id for i in again.items
                                                  if i.receipt)


def test_traffic_counts_every_message_both_ways(family, tmp_path: Path) -> None:
    client, bundle = family
    data = _photo(tmp_path / "big.png", 7, (600, 800)).read_bytes()
    sent0, received0 = client.traffic.snapshot()
    receipt = photos.backup_photo(client, bundle, data, [0])
    sent1, received1 = client.traffic.snapshot()
    # the encrypted photo, thumbnail and labels, plus a little protobuf framing
    assert receipt.bytes_sent <= sent1 - sent0 <= receipt.bytes_sent + 1024
    assert 0 < received1 - received0 < 1024
    assert photos.fetch_photo(client, bundle, receipt.photo_id) == data
    sent2, received2 = client.traffic.snapshot()
    assert 0 < sent2 - sent1 < 1024
    assert len(data) < received2 - received1 <= len(data) + 1024
