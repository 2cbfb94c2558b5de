"""The client's dependency rules (DESIGN.md): Kivy only under client/app/ and never in its
controllers; the app reaches the server only through the client core; only client/rpc.py
touches the generated stubs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "client" / "app"
FORBIDDEN_IN_APP = ("privface", "server", "grpc", "client.rpc")  # stubs, transport, server


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*.py")]


def test_kivy_only_in_the_app_screens() -> None:
    outside = [p for p in _sources("common", "server", "client", "bench")
               if APP not in p.parents]
    controllers = list((APP / "controllers").rglob("*.py"))
    offenders = [str(p.relative_to(ROOT)) for p in outside + controllers
                 if any(_under(m, "kivy") for m in _imports(p))]
    assert outside and controllers and offenders == []


def test_app_uses_only_the_client_core() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                                  if any(_under(m, f) for f in FORBIDDEN_IN_APP))
                 for p in APP.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_rpc_touches_the_stubs() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _sources("client")
                 if p != ROOT / "client" / "rpc.py"
                 and any(_under(m, "privface") for m in _imports(p))]
    assert offenders == []


def test_controllers_import_without_kivy() -> None:
    code = ("import sys, client.app.controllers.registry; "
            "sys.exit('kivy' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_every_screen_has_its_kv_file() -> None:
    modules = {p.stem for p in (APP / "screens").glob("*.py")} - {"__init__", "base"}
    kv = {p.stem for p in (APP / "screens").glob("*.kv")}
    assert modules == kv and len(kv) == 6
