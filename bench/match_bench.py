"""Encrypted face matching benchmark: the seed paper's method vs the packed matcher vs numpy.

One run, side by side:
  (a) seed method (seeds/001): one embedding per ciphertext, N=8192 [60,40,40,60], scale
      2^40, full Galois keys; per pair: sub, square, relinearise, rescale, then 127
      rotate-by-1-and-add (their Fig. 3). Timed on --seed-pairs pairs, extrapolated.
  (b) packed matcher (common.ckks, default parameters and k), plus a k / parameter sweep.
  (c) plaintext numpy ||G - q||^2.
Accuracy on LFW pairsDevTrain (embeddings cached in bench/results/).

Usage:
  .venv/bin/python bench/match_bench.py --json bench/results/match.json \
      [--sizes 100,1000,10000] [--pairs 2200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common as bench_common  # noqa: E402
from common import ckks  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LFW = DATA / "lfw"
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "lfw_devtrain_embeddings.npz"
CENTRAL_BOX = (60, 190, 190, 60)  # (top, right, bottom, left) in LFW's 250x250 images


# --------------------------------------------------------------------------- helpers


def median_ms(fn, repeats):
    return bench_common.median_ms(fn, repeats, warmup=0)


def unit_ish(rng, n, norm=1.4):
    x = rng.normal(size=(n, ckks.DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * norm


def squared_distances(gallery, query):
    """Plaintext matching: squared distance of the query to every gallery entry."""
    return np.sum((gallery - query) ** 2, axis=1)


def decrypt_all(secret, results):
    return [ckks.decrypt_distances(secret, r) for r in results]


def lfw_pairs(limit=None):
    lines = (LFW / "pairsDevTrain.txt").read_text().split("\n")
    n = int(lines[0])
    out = []
    for line in lines[1 : 1 + 2 * n]:
        p = line.split("\t")
        if len(p) == 3:
            out.append((f"{p[0]}/{p[0]}_{int(p[1]):04d}.jpg",
                        f"{p[0]}/{p[0]}_{int(p[2]):04d}.jpg", True))
        else:
            out.append((f"{p[0]}/{p[0]}_{int(p[1]):04d}.jpg",
                        f"{p[2]}/{p[2]}_{int(p[3]):04d}.jpg", False))
    if limit and limit < len(out):
        # keep the same/different balance: evenly spaced over both halves
        idx = np.linspace(0, len(out) - 1, limit).round().astype(int)
        out = [out[i] for i in idx]
    return out


def _embed_one(rel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from client.pipeline.recognize import (
            NoFaceError,
            face_embeddings,
            load_rgb,
            primary_face_embedding,
        )
    path = LFW / "images" / rel
    try:
        return rel, primary_face_embedding(path), False
    except NoFaceError:
        return rel, face_embeddings(load_rgb(path), [CENTRAL_BOX])[0], True


def lfw_embeddings(rels, workers=2):
    """{relative path: embedding}, cached in bench/results; central box if HOG finds none."""
    cache, fallback = {}, set()
    if CACHE.is_file():
        z = np.load(CACHE, allow_pickle=False)
        cache = dict(zip(z["paths"].tolist(), z["emb"], strict=True))
        fallback = set(z["fallback"].tolist())
    todo = sorted(set(rels) - set(cache))
    if todo:
        print(f"[embed] {len(todo)} LFW images with face_recognition ({workers} workers)...",
              flush=True)
        t = time.time()
        from multiprocessing import Pool

        with Pool(workers) as pool:
            for i, (rel, e, fb) in enumerate(pool.imap_unordered(_embed_one, todo, chunksize=8)):
                cache[rel] = e
                if fb:
                    fallback.add(rel)
                if (i + 1) % 500 == 0:
                    print(f"[embed] {i + 1}/{len(todo)} ({time.time() - t:.0f} s)", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        paths = sorted(cache)
        np.savez(CACHE, paths=np.array(paths), emb=np.array([cache[p] for p in paths]),
                 fallback=np.array(sorted(fallback), dtype=str))
        print(f"[embed] done in {time.time() - t:.0f} s", flush=True)
    return cache, fallback


# --------------------------------------------------------------------------- (a) seed method


def bench_seed(n_pairs, rng, repeats):
    """The seed paper's per-pair method, implemented with tenseal.sealapi as PySEAL does."""
    import tenseal as ts
    from tenseal import sealapi as S

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    t = time.perf_counter()
    ctx.generate_galois_keys()
    keygen_s = time.perf_counter() - t
    pub = ctx.copy()
    pub.make_context_public()
    key_bytes = len(pub.serialize(save_public_key=True, save_galois_keys=True,
                                  save_relin_keys=True))
    seal = ctx.seal_context().data
    enc = S.CKKSEncoder(seal)
    ev = S.Evaluator(seal)
    encryptor = S.Encryptor(seal, ctx.public_key().data)
    dec = S.Decryptor(seal, ctx.secret_key().data)
    rk, gk = ctx.relin_keys().data, ctx.galois_keys().data

    def encrypt(v):
        pt = S.Plaintext()
        enc.encode(list(map(float, v)), 2.0**40, pt)
        ct = S.Ciphertext()
        encryptor.encrypt(pt, ct)
        return ct

    x = unit_ish(rng, n_pairs)
    y = unit_ish(rng, n_pairs)
    ct_x = [encrypt(v) for v in x]
    ct_y = [encrypt(v) for v in y]
    enc_ms = median_ms(lambda: encrypt(x[0]), repeats)
    ct_bytes = len(ckks._save_bytes(ct_x[0]))

    def pair(a, b):
        d = S.Ciphertext()
        ev.sub(a, b, d)  # sub_inplace(cipher_embedding1 - cipher_embedding2)
        ev.square_inplace(d)  # square_inplace
        ev.relinearize_inplace(d, rk)
        ev.rescale_to_next_inplace(d)
        acc = S.Ciphertext()
        ev.add(d, d, acc)
        ev.sub_inplace(acc, d)  # acc = encrypted1 (a copy of d)
        for _ in range(1, 128):  # Fig. 3
            ev.rotate_vector_inplace(d, 1, gk)
            ev.add_inplace(acc, d)
        return acc

    times, errs = [], []
    for i in range(n_pairs):
        t = time.perf_counter()
        r = pair(ct_x[i], ct_y[i])
        times.append((time.perf_counter() - t) * 1e3)
        pt = S.Plaintext()
        dec.decrypt(r, pt)
        got = enc.decode_double(pt)[0]
        errs.append(abs(got - float(np.sum((x[i] - y[i]) ** 2))))
    return {
        "params": "N=8192 [60,40,40,60] scale 2^40, one embedding per ciphertext, full Galois keys",
        "ms_per_pair": statistics.median(times),
        "pairs_timed": n_pairs,
        "key_upload_bytes": key_bytes,
        "galois_keygen_s": keygen_s,
        "query_upload_bytes_per_face": ct_bytes,
        "gallery_bytes_per_entry": ct_bytes,
        "phone_encrypt_ms": enc_ms,
        "max_abs_err_sq": max(errs),
    }


# --------------------------------------------------------------------------- (b) packed


def build_gallery(secret, public, emb):
    """Blocks as the server stores them (add_into_block of a fresh block is the identity)."""
    return [ckks.add_into_block(public, None, cts) for cts in ckks.encrypt_gallery(secret, emb)]


def bench_packed(params, k, sizes, rng, repeats, full=True):
    secret = ckks.create_secret_context(params, k=k)
    pub_bytes = ckks.public_context_bytes(secret)
    public = ckks.load_public_context(pub_bytes)
    lay = secret.layout
    q = unit_ish(rng, 1)[0]
    query = ckks.encrypt_query(secret, q)
    out = {
        "params": f"N={params.poly_modulus_degree} {list(params.coeff_mod_bit_sizes)} "
        f"scale 2^{params.scale_bits} k={k}",
        "k": k,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "scale_bits": params.scale_bits,
        "entries_per_block": lay.entries_per_block,
        "cts_per_block": lay.cts_per_block,
        "rotation_keys": len(lay.rotation_steps),
        "key_upload_bytes": len(pub_bytes),
        "query_upload_bytes_per_face": sum(map(len, query)),
        "phone_encrypt_query_ms": median_ms(lambda: ckks.encrypt_query(secret, q), repeats),
        "sizes": {},
    }
    one_block = None
    for n in sizes:
        emb = unit_ish(rng, n)
        t = time.perf_counter()
        blocks = build_gallery(secret, public, emb)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        prepared = ckks.PreparedGallery(public, blocks)
        prep_s = time.perf_counter() - t
        results = prepared.match(query)  # warm-up
        ms = median_ms(functools.partial(prepared.match, query), repeats)
        dec_ms = median_ms(
            functools.partial(decrypt_all, secret, results), max(1, repeats // 2)
        )
        got = np.concatenate([ckks.decrypt_distances(secret, r) for r in results])[:n]
        err = float(np.abs(got - np.linalg.norm(emb - q, axis=1)).max())
        out["sizes"][str(n)] = {
            "blocks": len(blocks),
            "query_server_ms": ms,
            "us_per_entry": ms * 1e3 / n,
            "phone_decrypt_ms": dec_ms,
            "result_download_bytes": sum(map(len, results)),
            "gallery_upload_bytes": sum(len(c) for b in blocks for c in b),
            "phone_encrypt_gallery_s": build_s,
            "server_prepare_s": prep_s,
            "max_abs_err_random": err,
        }
        if one_block is None:
            one_block = blocks[0]
        print(f"  {out['params']:<40} n={n:>6}: {ms:8.1f} ms/query  "
              f"{ms * 1e3 / n:7.1f} us/entry  err {err:.1e}", flush=True)
        del prepared, blocks
    if full:
        # incremental add: server cost of adding one new entry's ciphertexts into a block
        new = ckks.encrypt_entries(secret, unit_ish(rng, 1), 1)
        out["add_into_block_ms"] = median_ms(
            lambda: ckks.add_into_block(public, one_block, new), repeats
        )
        out["phone_encrypt_entry_ms"] = median_ms(
            lambda: ckks.encrypt_entries(secret, unit_ish(rng, 1), 0), repeats
        )
        out["gallery_upload_bytes_per_new_entry"] = sum(map(len, new))
    return out, secret, public


# --------------------------------------------------------------------------- accuracy


def lfw_accuracy(secret, public, pairs, emb):
    """Every pair through the real API: gallery = first images, queries = second images.

    Pair i's query is matched against the block holding a_i; every distance of that block
    (128 per query) is compared with plaintext too.
    """
    a = np.array([emb[p[0]] for p in pairs])
    b = np.array([emb[p[1]] for p in pairs])
    same = np.array([p[2] for p in pairs])
    blocks = build_gallery(secret, public, a)
    prepared = [ckks.prepare_block(public, blk) for blk in blocks]
    lay = secret.layout
    E = lay.entries_per_block
    enc_pair, all_enc, all_plain = [], [], []
    t = time.time()
    for i in range(len(pairs)):
        blk = i // E
        q = ckks.encrypt_query(secret, b[i])
        res = ckks.match_block(public, prepared[blk], q)
        n_in = min(E, len(pairs) - blk * E)
        d = ckks.decrypt_distances(secret, res, n_in)
        enc_pair.append(d[i - blk * E])
        all_enc.append(d)
        all_plain.append(np.linalg.norm(a[blk * E : blk * E + n_in] - b[i], axis=1))
    enc_pair = np.array(enc_pair)
    plain_pair = np.linalg.norm(a - b, axis=1)
    all_enc, all_plain = np.concatenate(all_enc), np.concatenate(all_plain)
    abs_err = np.abs(all_enc - all_plain)
    # squared distances are what CKKS computes; sqrt amplifies noise near 0 (same image)
    sq_err = np.abs(all_enc**2 - all_plain**2)
    near = (all_plain > 0.4) & (all_plain < 0.8)
    rel = np.abs(enc_pair - plain_pair) / plain_pair  # seed paper eq. (3)
    tol = ckks.TOLERANCE
    margin = np.abs(all_plain - tol)
    return {
        "pairs": len(pairs),
        "distances_compared": int(all_enc.size),
        "seconds": time.time() - t,
        "max_abs_err": float(abs_err.max()),
        "median_abs_err": float(np.median(abs_err)),
        "max_abs_err_squared": float(sq_err.max()),
        "max_abs_err_distance_in_0.4_0.8": float(abs_err[near].max()) if near.any() else None,
        "max_abs_err_distance_above_0.1": float(abs_err[all_plain > 0.1].max()),
        "pair_max_abs_err": float(np.abs(enc_pair - plain_pair).max()),
        "rel_err_median": float(np.median(rel)),
        "rel_err_max": float(rel.max()),
        "rel_err_frac_below_0.02pct": float(np.mean(rel < 2e-4)),
        "decision_flips_pairs": int(np.sum((enc_pair <= tol) != (plain_pair <= tol))),
        "decision_flips_all": int(np.sum((all_enc <= tol) != (all_plain <= tol))),
        "closest_plain_distance_to_tolerance": float(margin.min()),
        "verification_accuracy_plain": float(np.mean((plain_pair <= tol) == same)),
        "verification_accuracy_encrypted": float(np.mean((enc_pair <= tol) == same)),
    }


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--pairs", type=int, default=2200, help="LFW pairsDevTrain pairs (max 2200)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed-pairs", type=int, default=7)
    ap.add_argument("--sweep-k", default="8,16,32")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--embed-only", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = max(5, args.repeats)
    rng = np.random.default_rng(2024)

    have_lfw = (LFW / "pairsDevTrain.txt").is_file()
    pairs = lfw_pairs(args.pairs) if have_lfw and args.pairs > 0 else []
    if pairs:
        emb, fallback = lfw_embeddings([r for p in pairs for r in p[:2]], args.workers)
    if args.embed_only:
        return 0

    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "repeats": repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }

    print("(c) plaintext numpy")
    plain = {}
    q = unit_ish(rng, 1)[0]
    for n in sizes:
        G = unit_ish(rng, n)
        ms = median_ms(functools.partial(squared_distances, G, q), max(repeats, 21))
        plain[str(n)] = {"query_ms": ms, "us_per_entry": ms * 1e3 / n}
    report["plain"] = plain

    print("(b) packed matcher, default parameters")
    packed, secret, public = bench_packed(ckks.DEFAULT_PARAMS, ckks.DEFAULT_K, sizes, rng, repeats)
    report["packed"] = packed

    sweep = []
    if not args.no_sweep:
        print("(b') sweep: k and parameter sets (1k and 10k entries)")
        sweep_sizes = [s for s in sizes if s in (1000, 10000)] or sizes[-1:]
        configs = [(ckks.DEFAULT_PARAMS, int(k)) for k in args.sweep_k.split(",")
                   if int(k) != ckks.DEFAULT_K]
        configs += [(ckks.CKKSParams(4096, (54, 55), 24), 16),
                    (ckks.CKKSParams(8192, (60, 40, 60), 40), 16),
                    (ckks.CKKSParams(8192, (60, 40, 60), 40), 32)]
        for params, k in configs:
            r, s2, p2 = bench_packed(params, k, sweep_sizes, rng, repeats, full=False)
            if pairs:
                sub = pairs[:: max(1, len(pairs) // 400)]
                r["lfw_subset"] = lfw_accuracy(s2, p2, sub, emb)
                r["lfw_subset"].pop("seconds")
            sweep.append(r)
    report["sweep"] = sweep

    print(f"(a) seed method on {args.seed_pairs} pairs")
    seed = bench_seed(args.seed_pairs, rng, repeats)
    report["seed"] = seed

    if pairs:
        print(f"accuracy on {len(pairs)} LFW pairsDevTrain pairs (default parameters)")
        acc = lfw_accuracy(secret, public, pairs, emb)
        acc["central_box_fallbacks"] = len(
            fallback & {r for p in pairs for r in p[:2]}
        )
        report["lfw"] = acc
    else:
        report["lfw"] = {"skipped": f"LFW data absent at {LFW}"}

    big = str(max(sizes))
    k10 = "10000" if "10000" in packed["sizes"] else big
    k1 = "1000" if "1000" in packed["sizes"] else big
    report.update({
        "us_per_entry_10k": packed["sizes"][k10]["us_per_entry"],
        "query_ms_1k": packed["sizes"][k1]["query_server_ms"],
        "seed_method_ms_per_pair": seed["ms_per_pair"],
        "seed_method_us_per_entry_10k_extrapolated": seed["ms_per_pair"] * 1e3,
        "plain_us_per_entry_10k": plain[k10]["us_per_entry"],
        "key_upload_bytes": packed["key_upload_bytes"],
        "query_upload_bytes_per_face": packed["query_upload_bytes_per_face"],
        "max_abs_err": report["lfw"].get("max_abs_err", packed["sizes"][k10]["max_abs_err_random"]),
    })

    # ------------------------------------------------------------------ table
    print()
    hdr = f"{'':34}{'seed (a)':>14}{'packed (b)':>14}{'numpy (c)':>12}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        s = str(n)
        print(f"{'server ms / query, n=' + s:34}{seed['ms_per_pair'] * n:>14.1f}"
              f"{packed['sizes'][s]['query_server_ms']:>14.1f}{plain[s]['query_ms']:>12.3f}")
    for n in sizes:
        s = str(n)
        print(f"{'us / gallery entry, n=' + s:34}{seed['ms_per_pair'] * 1e3:>14.0f}"
              f"{packed['sizes'][s]['us_per_entry']:>14.1f}{plain[s]['us_per_entry']:>12.4f}")
    print(f"{'key upload (one-time) bytes':34}{seed['key_upload_bytes']:>14,}"
          f"{packed['key_upload_bytes']:>14,}{'-':>12}")
    print(f"{'query upload bytes / face':34}{seed['query_upload_bytes_per_face']:>14,}"
          f"{packed['query_upload_bytes_per_face']:>14,}{'-':>12}")
    print(f"{'phone encrypt ms / face':34}{seed['phone_encrypt_ms']:>14.2f}"
          f"{packed['phone_encrypt_query_ms']:>14.2f}{'-':>12}")
    s1 = packed["sizes"][k1]
    print(f"{'phone decrypt ms, n=' + k1:34}{'-':>14}{s1['phone_decrypt_ms']:>14.2f}{'-':>12}")
    print(f"{'result download bytes, n=' + k1:34}{'-':>14}"
          f"{s1['result_download_bytes']:>14,}{'-':>12}")
    if sweep:
        print("\nsweep (n = 10k where run):")
        for r in sweep:
            s = r["sizes"].get("10000") or list(r["sizes"].values())[-1]
            acc = r.get("lfw_subset", {})
            print(f"  {r['params']:<40} {s['us_per_entry']:6.1f} us/entry  "
                  f"query up {r['query_upload_bytes_per_face']:>9,} B  "
                  f"keys {r['key_upload_bytes']:>10,} B  LFW max dist err (d>0.1) "
                  f"{acc.get('max_abs_err_distance_above_0.1', float('nan')):.1e} "
                  f"flips {acc.get('decision_flips_all', '-')}")
    if pairs:
        a = report["lfw"]
        print(f"\nLFW ({a['pairs']} pairs, {a['distances_compared']} distances): max abs err "
              f"{a['max_abs_err']:.2e} (squared {a['max_abs_err_squared']:.2e}, near 0.6 "
              f"{a['max_abs_err_distance_in_0.4_0.8']:.2e}), median {a['median_abs_err']:.2e}; "
              f"rel err (eq. 3) median "
              f"{a['rel_err_median']:.2e}, max {a['rel_err_max']:.2e}; decision flips at 0.6: "
              f"{a['decision_flips_pairs']} pairs / {a['decision_flips_all']} all; accuracy "
              f"plain {a['verification_accuracy_plain']:.4f} "
              f"enc {a['verification_accuracy_encrypted']:.4f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
