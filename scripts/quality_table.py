#!/usr/bin/env python3
"""Regenerates the QUALITY.md table: converts SmolLM2 into relaxed recursive checkpoints over a
grid of settings, evaluates each on held-out text, calibrates exits, prints markdown rows.

    python3 scripts/quality_table.py [--loops 2,3] [--init stepwise,average,lower]
        [--ranks 0,16,64,128,256] [--svd plain,activation] [--out bench-out/quality]

Held-out text: the first 560,000 bytes of tinyshakespeare (8 windows of 256 tokens);
calibration (activation SVD and exits): the rest of the file. Needs `cargo build --release`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rrt = os.environ.get("RRT_BIN", os.path.join(root, "target", "release", "rrt"))
ap = argparse.ArgumentParser()
ap.add_argument("--loops", default="2,3")
ap.add_argument("--init", default="stepwise,average,lower")
ap.add_argument("--ranks", default="0,16,64,128,256")
ap.add_argument("--svd", default="plain,activation")
ap.add_argument("--windows", default="8")
ap.add_argument("--out", default=os.path.join(root, "bench-out", "quality"))
ap.add_argument("--keep", action="store_true", help="keep the converted checkpoints (~0.3-0.6 GB each)")
ap.add_argument("--cached-only", action="store_true", help="print the rows already computed, compute nothing")
a = ap.parse_args()
os.makedirs(a.out, exist_ok=True)
text = open(os.path.join(root, "..", "shared", "data", "tinyshakespeare.txt"), encoding="utf-8").read()
raw = text.encode("utf-8")
evalf, calf = os.path.join(a.out, "eval_part.txt"), os.path.join(a.out, "calib_part.txt")
open(evalf, "wb").write(raw[:560000])
open(calf, "wb").write(raw[560000:])

H, Q, KV, I, L = 576, 576, 192, 1536, 30
LAYER = H * (Q + 2 * KV) + Q * H + 3 * H * I + 2 * H
ORIG = L * LAYER + H
DIMS = {"q": (Q, H), "k": (KV, H), "v": (KV, H), "o": (H, Q), "gate": (I, H), "up": (I, H), "down": (H, I)}


def run(args):
    r = subprocess.run([rrt] + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"rrt {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def evaluate(model_args):
    out = json.loads(run(["eval", *model_args, "--text", evalf, "--windows", a.windows, "--json"]))
    return out


# Finished rows are cached in rows.json so an interrupted run resumes where it stopped.
cache_path = os.path.join(a.out, "rows.json")
cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}


def save_cache():
    tmp = cache_path + ".tmp"
    json.dump(cache, open(tmp, "w"), indent=1)
    os.replace(tmp, cache_path)


if "original" not in cache and not a.cached_only:
    cache["original"] = evaluate([])["ppl"]
    save_cache()
orig = {"ppl": cache.get("original", float("nan"))}
print("| B | init | rank | SVD | non-emb. params | % | ppl | loop agreement (1..B-1) | mean loops @0.9 | @0.95 |")
print("|---:|---|---:|---|---:|---:|---:|---|---:|---:|")
print(f"| - | original | - | - | {ORIG / 1e6:.1f} M | 100 | {orig['ppl']:.2f} | - | - | - |")
sys.stdout.flush()
for loops in map(int, a.loops.split(",")):
    for init in a.init.split(","):
        for rank in map(int, a.ranks.split(",")):
            for svd in a.svd.split(","):
                if rank == 0 and svd == "activation":
                    continue
                key = f"b{loops}-{init}-r{rank}-{svd}"
                d = os.path.join(a.out, key)
                k = L // loops
                params = k * LAYER + H + L * sum(min(rank, min(o, i)) * (o + i) for o, i in DIMS.values())
                if key not in cache and a.cached_only:
                    continue
                if key not in cache:
                    if not os.path.exists(os.path.join(d, "rrt_checkpoint.json")):
                        extra = ["--svd", "activation", "--calibration", calf] if svd == "activation" else []
                        # Ranks above a module's min(in, out) are refused by rrt convert; the table's
                        # rank means "up to full rank" for the small k/v projections.
                        ranks = ",".join(f"{m}={min(rank, min(o, i))}" for m, (o, i) in DIMS.items())
                        run(["convert", "--out", d, "--loops", str(loops), "--init", init, "--lora-ranks", ranks, *extra])
                    ev = evaluate(["--model", d])
                    out = run(["calibrate", "--model", d, "--text", calf, "--agreement", "0.9", "--also-agreement", "0.95", "--dry-run", "--json", "--tokens", "2048"])
                    ml = [json.loads(line)["mean_loops"] for line in out.splitlines() if line.strip()]
                    cache[key] = {"ppl": ev["ppl"], "agreement": [x["agreement"] for x in ev["loops"][:-1]], "mean_loops": ml}
                    save_cache()
                    if not a.keep:
                        shutil.rmtree(d, ignore_errors=True)
                row = cache[key]
                agree = ", ".join(f"{x:.3f}" for x in row["agreement"])
                ml = [f"{x:.2f}" for x in row["mean_loops"]]
                ev = {"ppl": row["ppl"]}
                print(f"| {loops} | {init} | {rank} | {svd} | {params / 1e6:.1f} M | {100 * params / ORIG:.0f} | {ev['ppl']:.1f} | {agree} | {ml[0]} | {ml[1]} |")
                sys.stdout.flush()
