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
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rrt = os.path.join(root, "target", "release", "rrt")
ap = argparse.ArgumentParser()
ap.add_argument("--loops", default="2,3")
ap.add_argument("--init", default="stepwise,average,lower")
ap.add_argument("--ranks", default="0,16,64,128,256")
ap.add_argument("--svd", default="plain,activation")
ap.add_argument("--windows", default="8")
ap.add_argument("--out", default=os.path.join(root, "bench-out", "quality"))
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


orig = evaluate([])
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
                d = os.path.join(a.out, f"b{loops}-{init}-r{rank}-{svd}")
                if not os.path.exists(os.path.join(d, "rrt_checkpoint.json")):
                    extra = ["--svd", "activation", "--calibration", calf] if svd == "activation" else []
                    # Ranks above a module's min(in, out) are refused by rrt convert; the table's
                    # rank means "up to full rank" for the small k/v projections.
                    ranks = ",".join(f"{m}={min(rank, min(o, i))}" for m, (o, i) in DIMS.items())
                    run(["convert", "--out", d, "--loops", str(loops), "--init", init, "--lora-ranks", ranks, *extra])
                k = L // loops
                params = k * LAYER + H + L * sum(min(rank, min(o, i)) * (o + i) for o, i in DIMS.values())
                ev = evaluate(["--model", d])
                agree = ", ".join(f"{x['agreement']:.3f}" for x in ev["loops"][:-1])
                ml = []
                for target in ("0.9", "0.95"):
                    c = json.loads(run(["calibrate", "--model", d, "--text", calf, "--agreement", target, "--dry-run", "--json", "--tokens", "2048"]))
                    ml.append(f"{c['mean_loops']:.2f}")
                print(f"| {loops} | {init} | {rank} | {svd} | {params / 1e6:.1f} M | {100 * params / ORIG:.0f} | {ev['ppl']:.1f} | {agree} | {ml[0]} | {ml[1]} |")
                sys.stdout.flush()
