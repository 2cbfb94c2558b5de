"""The privface CLI in-process against a real server: the user-visible flow and errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from client.cli import main


@pytest.fixture
def cli_env(address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRIVFACE_SERVER", address)
    monkeypatch.setenv("PRIVFACE_BUNDLE", str(tmp_path / "family.bundle"))
    monkeypatch.setenv("PRIVFACE_PASSPHRASE", "a test passphrase")
    return tmp_path


def _photo(path: Path, seed: int) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (40, 50, 3), np.uint8))
    return path


def test_family_backup_search_fetch_delete(cli_env: Path, capsys) -> None:
    assert main(["family", "create"]) == 0
    assert main(["people", "add", "Mum", "Tom"]) == 0
    a, b = _photo(cli_env / "a.png", 1), _photo(cli_env / "b.png", 2)
    assert main(["backup", str(a), "--people", "Mum,Tom"]) == 0
    assert main(["backup", str(b), "--people", "Tom"]) == 0
    capsys.readouterr()
    assert main(["search", "--people", "Mum,Tom"]) == 0
    both = capsys.readouterr().out.split()
    assert main(["search", "--people", "Tom"]) == 0
    tom = capsys.readouterr().out.split()
    assert len(both) == 1 and len(tom) == 2 and both[0] in tom
    assert main(["fetch", both[0], "-o", str(cli_env / "out.png")]) == 0
    assert (cli_env / "out.png").read_bytes() == a.read_bytes()
    assert main(["delete", both[0]]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == [t for t in tom if t != both[0]]


def test_clear_errors(cli_env: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["search", "--people", "Mum"]) == 1
    assert "privface family create" in capsys.readouterr().err
    assert main(["family", "create"]) == 0
    assert main(["search", "--people", "Bob"]) == 1
    assert "unknown person 'Bob'" in capsys.readouterr().err
    assert main(["fetch", "0" * 32, "-o", str(cli_env / "x")]) == 1
    assert "no photo" in capsys.readouterr().err
    monkeypatch.setenv("PRIVFACE_PASSPHRASE", "the wrong passphrase")
    assert main(["people"]) == 1
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.setenv("PRIVFACE_PASSPHRASE", "a test passphrase")
    monkeypatch.setenv("PRIVFACE_SERVER", "127.0.0.1:1")
    assert main(["list"]) == 1
    assert "is privface-server running" in capsys.readouterr().err
