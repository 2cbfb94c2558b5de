"""Mutation testing (mutmut 3) of the security-relevant code, one target at a time.

Each target is a set of source files, the fast tests that exercise them and, for the large
modules, the functions whose mutants are run (the security-relevant ones; every function
otherwise). A target runs in its own copy of the tree under ``--workdir`` (default
``var/mutation/<target>``), never in the working tree: mutmut writes a ``mutants/`` folder
next to the sources and the scoped ``[tool.mutmut]`` settings go into the copy's
pyproject.toml. mutmut runs each mutant only against the tests that call the mutated
function (measured once per target), in forked workers (``forkserver``: gRPC is not
fork-safe).

Surviving mutants are classified: *cosmetic* when the only change is the text of an error,
log or gRPC status message, or a log call's arguments (found from the syntax trees of the
original and the mutant), or a rule in COSMETIC says the value only reaches a message;
*equivalent* when the change is only the letter case of SQL text or a rule in EQUIVALENT
says why the mutant cannot behave differently; else *open* ("no tests" when no test calls
the function). The JSON summary has, per module: mutants run, killed, timeouts, survived
(with the cosmetic and equivalent among them), the score (killed + timeouts over mutants
run), and every survivor with its diff.

Caveat of mutmut's trampolines: code that runs at import (module constants, decorators,
keys a test module makes at import) runs unmutated, so tests that should kill mutants of
such functions must call them inside the test.

    .venv/bin/python bench/mutation.py --json bench/results/mutation.json  # ~60 min, 2 cores
    .venv/bin/python bench/mutation.py --target photo_crypto --target aspe  # some targets
    .venv/bin/python bench/mutation.py --resume   # re-test the last run's survivors (after
                                                  # adding tests; --open-only: the open ones)
    .venv/bin/python bench/mutation.py --continue  # finish an interrupted run
    .venv/bin/python bench/mutation.py --summary-only --json ...  # summarise, run nothing
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_json  # noqa: E402

PACKAGES = ("common", "server", "client", "tests")


@dataclass(frozen=True)
class Target:
    """Files to mutate, the pytest arguments that select their tests, and (optionally) the
    functions whose mutants run: ``Class.method`` or ``function`` names per file."""

    files: tuple[str, ...]
    tests: tuple[str, ...]
    functions: dict[str, tuple[str, ...]] = field(default_factory=dict)


# Server tests that start the server as a subprocess, wait on wall-clock timers or need
# the real photos are left out: a mutant in a subprocess is not seen by mutmut, and the
# timers make every surviving mutant cost seconds.
SERVER_TESTS = (
    "tests/server/test_credentials.py",
    "tests/server/test_devices.py",
    "tests/server/test_family_delete.py",
    "tests/server/test_input_validation.py",
    "tests/server/test_limits.py",
    "tests/server/test_persistence.py",
    "tests/server/test_photo_service.py",
    "tests/server/test_state_over_time.py",
)

TARGETS: dict[str, Target] = {
    "photo_crypto": Target(
        files=("common/photo_crypto.py",),
        tests=("tests/common/test_photo_crypto.py", "tests/common/test_associated_data.py"),
    ),
    "aspe": Target(
        files=("common/aspe.py",),
        tests=("tests/common/test_aspe.py", "tests/common/test_aspe_leakage.py",
               "tests/common/test_labels.py"),
    ),
    "ckks": Target(
        files=("common/ckks.py",),
        tests=("tests/common/test_ckks.py", "tests/common/test_ckks_checks.py",
               "-k", "not lfw"),
        # Parameter and security checks, (de)serialisation of contexts and ciphertexts,
        # input checks and the additions the server makes; not the arithmetic of matching
        # (its mutants are caught by the distance tests but cost a CKKS run each).
        functions={"common/ckks.py": (
            "check_security", "CKKSParams.__post_init__", "GalleryLayout.__post_init__",
            "_Base.__post_init__", "SecretContext.__post_init__",
            "PublicContext.__post_init__", "_pack_sections", "_unpack_sections",
            "_parse_ctx_header", "context_key_id", "load_secret_context",
            "load_public_context", "_unwrap", "_check_embeddings", "_check_block_list",
            "add_into_block", "decrypt_squared_distances", "nearest", "assign",
        )},
    ),
    "keystore": Target(
        files=("client/keystore.py",),
        tests=("tests/client/test_keystore.py",),
    ),
    "server": Target(
        files=("server/auth.py", "server/errors.py", "server/uploads.py",
               "server/decoding.py", "server/label_index.py", "server/servicers/photos.py",
               "server/servicers/family.py", "server/storage.py"),
        tests=SERVER_TESTS,
        # Every mutant of a function that most server tests call runs most of the server
        # suite (a real server per test), so on 2 cores the functions are chosen: the
        # credential check, upload size checks, photos (store, fetch, delete, quota
        # accounting), devices and invitations, the label index, request decoding's
        # refusal; not the schema, gallery, detector or context-upload code, the log-line
        # helpers, or the decoding interceptor's plumbing.
        functions={
            "server/errors.py": ("printable", "_abort", "grpc_errors"),
            "server/decoding.py": ("_refuse", "_complaint", "_Undecodable.__repr__"),
            "server/servicers/family.py": (),
            "server/storage.py": (
                "hash_token", "Store.authenticate", "Store.create_invite", "Store.join_family",
                "Store.revoke_device", "Store.get_photo", "Store.has_photo", "Store.put_photo",
                "Store.delete_photo", "Store.delete_family", "Store.photo_usage",
                "Store._change_usage"),
        },
    ),
}


# Mutants that cannot change behaviour, as (file glob, removed-line regex, added-line
# regex, why). Matched against the one-line diff of a survivor.
EQUIVALENT: list[tuple[str, str, str, str]] = [
    ("*", r"token_bytes\((KEY_BYTES|SALT_BYTES|NONCE_BYTES)\)", r"token_bytes\(None\)",
     "secrets.token_bytes(None) draws 32 bytes, the same as the constant"),
    ("*", r"struct\.(un)?pack(_from)?\(['\"][<>][HIQ]+['\"]|calcsize\(['\"]<HQ",
     r"struct\.(un)?pack(_from)?\(['\"][<>][hiq]+['\"]|calcsize\(['\"]<hq",
     "lengths, versions and dims below 2**31 pack alike signed or unsigned"),
    ("*", r"astype\(['\"]<f8['\"]\)|frombuffer\(.*['\"]<f8['\"]",
     r"astype\(None\)|^(?!.*<f8).*frombuffer\(|frombuffer\(.*dtype=None",
     "numpy's default float64 is little-endian <f8 on every supported machine"),
    ("*", r"np\.asarray\((\w+), dtype=np\.float64\)", r"np\.asarray\(\w+(, dtype=None)?\)",
     "the values are promoted to float64 by the arithmetic (or compared) where they are used"),
    ("common/ckks.py", r"n_threads", r"n_threads(: int)?=(2|None)|load\(\w+\)",
     "the number of SEAL threads changes the speed, not the result"),
    ("common/ckks.py", r"zip\(old_cts, new_cts, strict=True\)",
     r"zip\(old_cts, new_cts(, strict=\w+)?\)",
     "both lists were checked to hold cts_per_block ciphertexts"),
    ("common/ckks.py", r"poly_modulus_degree // 2", r"poly_modulus_degree / 2",
     "N is a power of two: N / 2 == N // 2"),
    ("common/ckks.py", r"DIM % self\.k or self\.k & self\.k - 1",
     r"\(DIM % self\.k and self\.k & self\.k - 1\)|\(self\.k > DIM and DIM % self\.k\)",
     "for DIM = 128 'k divides DIM' and 'k is a power of two <= DIM' are the same test"),
    ("common/ckks.py", r"not (self\.context|ctx)\.is_public\(\) or",
     r"not (self\.context|ctx)\.is_public\(\) and",
     "a TenSEAL context is public exactly when it holds no secret key"),
    ("common/ckks.py", r"scale <= 0:", r"scale < 0:",
     "SEAL itself refuses to load a ciphertext whose scale is 0"),
    ("common/ckks.py", r"ctx\.scale_bits\) > 1e-06", r"ctx\.scale_bits\) >= 1e-06",
     "differs only for a log2 scale exactly 1e-6 off"),
    ("server/label_index.py", r"kind='stable'", r"kind='STABLE'",
     "numpy reads sort kinds case-insensitively"),
    ("server/label_index.py", r"np\.(empty|zeros)\(\(?1024|if need > len|cap = max|"
     r"len\(self\._ids\) > 1024",
     r"1025|>= len|cap = max|>= 1024|> 1025|<= len\(self\._ids\)|/ 2|// 3| or ",
     "initial size, growth and compaction points change memory use, not results"),
    ("server/label_index.py", r"n = len\(self\._ids\)", r"n = None",
     "rows past n are never alive: slicing to the end keeps the same hits"),
    ("server/servicers/photos.py", r"else np\.empty\(0\)", r"else np\.empty\((1|None)?\)",
     "a label vector of a partial float is refused by its size either way"),
    ("server/label_index.py", r"self\._alive\[row\] = False", r"self\._alive\[row\] = None",
     "None stored in a bool array is False"),
    ("server/label_index.py", r"_family_lock\(family_id\)", r"_family_lock\(None\)",
     "one lock shared by every family only serialises them"),
    ("server/auth.py", r"metadata\.get\((FAMILY|AUTH)_HEADER, ''\)",
     r"metadata\.get\((FAMILY_HEADER(, None)?|AUTH_HEADER(, None|, 'XXXX')?)\)",
     "a missing header fails the same check (not a str, or no 'Bearer ')"),
    ("server/label_index.py", r"_family_locks\.(setdefault|pop)\(family_id",
     r"_family_locks\.(setdefault\(None|pop\(None|pop\(family_id\))",
     "family locks only serialise; forget runs after taking (so creating) the lock"),
    ("server/storage.py", r"now - last_seen >= LAST_SEEN_EVERY",
     r"now - last_seen > LAST_SEEN_EVERY", "the last-seen write happens one tick later"),
    ("server/storage.py", r"files=0\)", r"files=(None|1)\)",
     "the placeholder is replaced by the count of removed files before returning"),
    ("server/storage.py", r"usage = self\._usage\.get\(family_id\)",
     r"usage = (None|self\._usage\.get\(None\))",
     "without the cache the usage is counted from the rows: the same numbers"),
    ("server/storage.py", r"self\._change_usage\(db, family_id, (1, size|-1, )",
     r"self\._change_usage\(None, family_id, (1, size|-1, )",
     "the usage was cached by the call just before: the connection is not used"),
    ("server/storage.py", r"token_urlsafe\(32\)", r"token_urlsafe\((None|33)\)",
     "token_urlsafe(None) draws 32 bytes; 33 bytes is longer, not weaker"),
    ("server/storage.py", r"blob_file\.unlink\(missing_ok=True\)",
     r"blob_file\.unlink\(missing_ok=(None|False)\)",
     "the uploaded blob file always exists when put_photo removes it"),
    ("*", r"\.(en|de)code\('[a-z0-9_-]+'\)", r"\.(en|de)code\('[A-Z0-9_-]+'\)",
     "codec names are case-insensitive"),
    ("client/keystore.py", r"n & n - 1", r"n & n - 2",
     "for n >= 2, n & (n - 2) is zero exactly for the powers of two too"),
    ("client/keystore.py", r"len\(blob\) < len\(MAGIC\) \+ 4",
     r"len\(blob\) (<= len\(MAGIC\) \+ 4|< len\(MAGIC\) \+ 5)",
     "a header length with no header after it is refused as not a bundle by the next check"),
    ("client/keystore.py", r"json\.dumps\(meta, sort_keys=True\)",
     r"json\.dumps\(meta(, sort_keys=(None|False))?\)",
     "the meta section is read back as a dict: key order does not matter"),
    ("client/keystore.py", r"unlink\(missing_ok=True\)", r"unlink\(missing_ok=(None|False)\)",
     "the temp file always exists when the clean-up runs"),
    ("common/aspe.py", r"np\.where\(rms > 0, rms, 1\.0\)", r"np\.where\(rms > 0, rms, 2\.0\)",
     "any non-zero share scale for an all-zero vector hides it alike"),
    ("common/aspe.py", r"u \* singular", r"u / singular",
     "1/s of log-uniform singular values symmetric around 1 has the same law and bound"),
    ("common/aspe.py", r"rng\.integers\(0, 2, size=n\)", r"rng\.integers\(2, size=n\)",
     "integers(2) draws from [0, 2) like integers(0, 2)"),
    ("common/aspe.py", r"len\(data\) < _HEADER\.size", r"len\(data\) <= _HEADER\.size",
     "a key of exactly the header size is refused by the next (length) check instead"),
]

# Mutants of values that only ever reach an error message (same form as EQUIVALENT).
COSMETIC: list[tuple[str, str, str, str]] = [
    ("common/ckks.py", r"_check_block_list\(.*'[\w ]+'\)", r"_check_block_list\(.*(None|'.*')\)",
     "the label only names the list in error messages"),
    ("common/ckks.py", r"what: str='embeddings'", r"what: str=",
     "the label only names the input in error messages"),
    ("common/ckks.py", r"n = None if cts is None else len\(cts\)", r"n = ",
     "n is only reported in the error message"),
    ("client/keystore.py", r"known = .* or 'none yet'", r"known = ",
     "only shown in the error message"),
    ("server/decoding.py", r"_complaint\(method\)|return f'the request to|return 'UNDECODABLE'",
     r"_complaint\(None\)|return f'the request to|return '",
     "the text of the refusal message, or the placeholder's repr"),
    ("server/label_index.py", r"elapsed = |SearchResult\(ids, elapsed\)",
     r"elapsed = |SearchResult\(ids, None\)", "the match time is only reported"),
    ("server/servicers/photos.py", r"header_then_parts\(request_iterator, 'BackupPhoto'|"
     r"check_limit\(.*, '(photo|thumbnail)'\)|CheckedChunks\(chunks, header\.blob_size, '",
     r"header_then_parts\(request_iterator, (None|'.*')|check_limit\(.*, (None|'.*')\)|"
     r"CheckedChunks\(chunks, header\.blob_size, (None|'.*')\)",
     "the label only names the call or the limit in error messages"),
]

MESSAGE_SINKS = {"abort", "set_details", "debug", "info", "warning", "error", "exception",
                 "critical", "log", "warn", "echo", "print"}


# -- running ---------------------------------------------------------------------------------


def _mangled(file: str, function: str) -> str:
    """The mutmut name prefix of a function (``Class.method`` or ``function``) in a file."""
    module = file.removesuffix(".py").replace("/", ".")
    if "." in function:
        cls, method = function.split(".", 1)
        return f"{module}.x\u01c1{cls}\u01c1{method}__mutmut_"
    return f"{module}.x_{function}__mutmut_"


def _patterns(target: Target) -> list[str]:
    """mutmut name globs for the target's functions (empty: every mutant)."""
    if not target.functions:
        return []
    patterns = []
    for file in target.files:
        names = target.functions.get(file)
        if names is None:
            module = file.removesuffix(".py").replace("/", ".")
            patterns.append(f"{module}.*")
        else:
            patterns += [_mangled(file, name) + "*" for name in names]
    return patterns


def _mutmut_config(target: Target) -> str:
    def toml_list(items: tuple[str, ...] | list[str]) -> str:
        return "[" + ", ".join(json.dumps(item) for item in items) + "]"

    return "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["common", "server", "client"]',
        f"only_mutate = {toml_list(target.files)}",
        f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]',
        # gRPC and SEAL threads: fork workers from a clean server process.
        'process_isolation = "forkserver"',
        "use_git_change_detection = false",
        "",
    ])


def _prepare(work: Path, target: Target, fresh: bool) -> None:
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, work / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pyproject = (ROOT / "pyproject.toml").read_text() + _mutmut_config(target)
    if not (work / "pyproject.toml").exists() or (work / "pyproject.toml").read_text() != pyproject:
        (work / "pyproject.toml").write_text(pyproject)


def _results(work: Path, target: Target) -> dict[str, dict[str, int | None]]:
    """Exit code per mutant, per file (mutmut's meta files)."""
    out = {}
    for file in target.files:
        meta = work / "mutants" / (file + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        out[file] = codes
    return out


def _selected(codes: dict[str, int | None], patterns: list[str]) -> dict[str, int | None]:
    if not patterns:
        return codes
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}


def run_target(name: str, target: Target, work: Path, *, resume: bool, carry_on: bool,
               children: int, open_only: bool = False) -> float:
    """Runs mutmut for one target; returns the wall time in seconds. ``resume``: re-test
    the survivors of the last run; ``carry_on``: test the selected mutants not yet tested
    (an interrupted run)."""
    _prepare(work, target, fresh=not (resume or carry_on))
    patterns = _patterns(target)
    names: list[str] = patterns
    if resume or carry_on:
        previous = {k: v for codes in _results(work, target).values()
                    for k, v in _selected(codes, patterns).items()}
        if not previous:
            raise SystemExit(f"no earlier run of {name} in {work}")
        wanted = ("survived", "no tests") if resume else ("not checked",)
        names = [k for k, v in previous.items() if status(v) in wanted]
        if resume and open_only:  # cosmetic and equivalent survivors are not re-run
            still_open = {s["mutant"] for m in summarise(work, target).values()
                          for s in m["survivors"] if s["class"] in ("open", "no tests")}
            names = [k for k in names if k in still_open]
        if not names:
            print(f"[{name}] nothing to (re-)test")
            return 0.0
    command = [str(Path(sys.executable).parent / "mutmut"), "run",
               "--max-children", str(children), *names]
    what = ("survivors" if resume else "untested" if carry_on
            else f"{len(names)} patterns" if names else "all mutants")
    count = f"{len(names)} " if resume or carry_on else ""
    print(f"[{name}] mutmut run over {', '.join(target.files)} ({count}{what}); "
          f"log in {work / 'mutmut.log'}", flush=True)
    start = time.monotonic()
    with open(work / "mutmut.log", "ab") as log:
        subprocess.run(command, cwd=work, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - start


# -- classifying and summarising ---------------------------------------------------------------


def status(code: int | None) -> str:
    """mutmut's verdict for a worker's exit code (mutmut/stats.py)."""
    if code in (1, 3):
        return "killed"
    if code == 0:
        return "survived"
    if code in (36, 24, -24, 152, 255):
        return "timeout"
    if code in (5, 33):
        return "no tests"
    if code is None:
        return "not checked"
    return "suspicious"


def _functions(source: str) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {node.name: node for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _differences(a: Any, b: Any, path: tuple[ast.AST, ...]
                 ) -> list[tuple[tuple[ast.AST, ...], Any, Any]]:
    """The smallest differing subtrees of two syntax trees, each with its ancestors."""
    if type(a) is not type(b) or not isinstance(a, ast.AST):
        return [] if a == b else [(path, a, b)]
    diffs: list[tuple[tuple[ast.AST, ...], Any, Any]] = []
    for name, va in ast.iter_fields(a):
        vb = getattr(b, name, None)
        if isinstance(va, list):
            if not isinstance(vb, list) or len(va) != len(vb):
                return [(path, a, b)]
            for x, y in zip(va, vb, strict=True):
                diffs += _differences(x, y, (*path, a))
        elif isinstance(va, ast.AST):
            diffs += _differences(va, vb, (*path, a))
        elif va != vb:
            return [(path, a, b)]
    return diffs


def _is_message(node: Any) -> bool:
    return node is None or isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str)))


def _in_sink(path: tuple[ast.AST, ...]) -> bool:
    for node in path:
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in MESSAGE_SINKS:
                return True
    return False


LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def _in_log_call(path: tuple[ast.AST, ...]) -> bool:
    """Inside ``log.<level>(...)`` (any change there only alters a log line)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in LOG_METHODS and isinstance(node.func.value, ast.Name)
               and node.func.value.id in ("log", "logger", "_log") for node in path)


def is_cosmetic(original: ast.AST, mutant: ast.AST) -> bool:
    """Whether the mutant only changes the text of a raised error, a log line or a gRPC
    status message."""
    body_a = ast.Module(body=list(getattr(original, "body", [])), type_ignores=[])
    body_b = ast.Module(body=list(getattr(mutant, "body", [])), type_ignores=[])
    diffs = _differences(body_a, body_b, ())
    if not diffs:
        return False
    for path, a, b in diffs:
        if _in_log_call((*path, a) if isinstance(a, ast.AST) else path):
            continue
        inside_fstring = any(isinstance(node, ast.JoinedStr) for node in path)
        if not ((_is_message(a) and _is_message(b)) or inside_fstring):
            return False
        if not _in_sink((*path, a) if isinstance(a, ast.AST) else path):
            return False
    return True


def _diff(original: ast.FunctionDef | ast.AsyncFunctionDef,
          mutant: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    def body(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
        signature = f"def ({ast.unparse(node.args)})" if isinstance(node, ast.FunctionDef) else ""
        return [signature, *"\n".join(ast.unparse(stmt) for stmt in node.body).splitlines()]

    lines = difflib.unified_diff(body(original), body(mutant), lineterm="", n=0)
    return [line.strip() for line in lines
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _sql_case_only(original: ast.AST, mutant: ast.AST) -> bool:
    """Whether the mutant only changes the letter case of SQL text (keywords, table and
    column names: case-insensitive in SQLite)."""
    diffs = _differences(ast.Module(body=list(getattr(original, "body", [])), type_ignores=[]),
                         ast.Module(body=list(getattr(mutant, "body", [])), type_ignores=[]),
                         ())
    for path, a, b in diffs:
        if not (isinstance(a, ast.Constant) and isinstance(b, ast.Constant)
                and isinstance(a.value, str) and isinstance(b.value, str)
                and a.value.lower() == b.value.lower()):
            return False
        calls = [n for n in path if isinstance(n, ast.Call)]
        names = {getattr(c.func, "attr", getattr(c.func, "id", "")) for c in calls}
        if not names & {"execute", "executemany", "count"}:
            return False
    return bool(diffs)


def classify(file: str, original: ast.FunctionDef | ast.AsyncFunctionDef,
             mutant: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    if is_cosmetic(original, mutant):
        return "cosmetic"
    if _sql_case_only(original, mutant):
        return "equivalent: SQL keywords and names are case-insensitive in SQLite"
    diff = _diff(original, mutant)
    removed = " ".join(line[1:] for line in diff if line.startswith("-"))
    added = " ".join(line[1:] for line in diff if line.startswith("+"))
    for rules, kind in ((COSMETIC, "cosmetic"), (EQUIVALENT, "equivalent")):
        for glob, before, after, why in rules:
            if (fnmatch.fnmatch(file, glob) and re.search(before, removed)
                    and re.search(after, added)):
                return "cosmetic" if kind == "cosmetic" else f"equivalent: {why}"
    return "open"


def summarise(work: Path, target: Target) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    patterns = _patterns(target)
    for file, codes in _results(work, target).items():
        codes = _selected(codes, patterns)
        if not codes:
            continue
        verdicts = {k: status(v) for k, v in codes.items() if status(v) != "not checked"}
        counts = Counter(verdicts.values())
        functions = _functions((work / "mutants" / file).read_text()) if codes else {}
        survivors: list[dict[str, Any]] = []
        for key in sorted(k for k, v in verdicts.items() if v in ("survived", "no tests")):
            func = key.rsplit(".", 1)[1]
            original = functions[func.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"]
            mutant = functions[func]
            verdict = classify(file, original, mutant)
            if verdict == "open" and verdicts[key] == "no tests":
                verdict = "no tests"
            survivors.append({"mutant": key, "class": verdict, "diff": _diff(original, mutant)})
        n = len(verdicts)
        caught = counts["killed"] + counts["timeout"]
        modules[file] = {
            "mutants": n, "killed": counts["killed"], "timeout": counts["timeout"],
            "survived": counts["survived"], "no_tests": counts["no tests"],
            "suspicious": counts["suspicious"],
            "cosmetic": sum(s["class"] == "cosmetic" for s in survivors),
            "equivalent": sum(s["class"].startswith("equivalent") for s in survivors),
            "open": sum(s["class"] in ("open", "no tests") for s in survivors),
            "score": round(caught / n, 4) if n else None,
            "functions": list(target.functions.get(file, ())) or "all",
            "survivors": survivors,
        }
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="a target to run (repeatable; default: all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "mutation",
                        help="where the copies of the tree go (default var/mutation)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the last run's results and re-test its survivors only")
    parser.add_argument("--continue", dest="carry_on", action="store_true",
                        help="keep the last run's results and test the mutants it did not reach")
    parser.add_argument("--open-only", action="store_true",
                        help="with --resume: re-test only the survivors classified open")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: summarise the results already in --workdir")
    parser.add_argument("--max-children", type=int, default=2, help="mutmut workers")
    parser.add_argument("--json", help="write the summary here (bench/results/mutation.json)")
    args = parser.parse_args(argv)

    names = args.target or list(TARGETS)
    seconds: dict[str, float] = {}
    modules: dict[str, Any] = {}
    for name in names:
        if not args.summary_only:
            seconds[name] = round(run_target(name, TARGETS[name], args.workdir / name,
                                             resume=args.resume, carry_on=args.carry_on,
                                             children=args.max_children,
                                             open_only=args.open_only), 1)
        # Summarised at once: the next target's run leaves this one's results alone.
        modules.update(summarise(args.workdir / name, TARGETS[name]))

    rows = [[file, m["mutants"], m["killed"], m["timeout"], m["survived"], m["cosmetic"],
             m["equivalent"], m["open"], f"{100 * (m['score'] or 0):.1f}%"]
            for file, m in modules.items()]
    print_table(["module", "mutants", "killed", "timeout", "survived", "cosmetic",
                 "equivalent", "open", "score"], rows)
    for m in modules.values():
        for survivor in m["survivors"]:
            if survivor["class"] in ("open", "no tests"):
                print(f"open  {survivor['mutant']}: {' | '.join(survivor['diff'])}")
    write_json(args.json, {
        "tool": "mutmut " + _mutmut_version(),
        "targets": {name: {"files": list(TARGETS[name].files),
                           "tests": list(TARGETS[name].tests)} for name in names},
        "seconds": seconds, "resumed": args.resume, "modules": modules,
    })
    return 0


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    sys.exit(main())
