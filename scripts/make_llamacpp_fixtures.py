#!/usr/bin/env python3
"""Reference fixtures from llama.cpp (through llama-cpp-python) for the default model.

Run once, commit the JSON it writes; CI never runs llama.cpp. Usage:
    python3 -m venv .venv-ref && . .venv-ref/bin/activate
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 numpy
    python3 scripts/make_llamacpp_fixtures.py models/SmolLM2-135M-Instruct.Q4_1.gguf fixtures/llamacpp

Writes:
  tokenize.json    strings -> ids with special parsing off and on (no BOS; SmolLM2 adds none)
  greedy.json      8+ prompts -> the first 32 greedy tokens (EOS not treated specially)
  perplexity.json  perplexity over the first N windows of 256 tokens of tinyshakespeare, each
                   window from an empty cache, scored from its second token
  logits.json      the 20 largest logits after one prompt, for a numeric spot check

Every greedy and logit reference is computed twice: on the Q4_1 file as shipped, and on an F32
copy of it (scripts/gguf_to_f32.py, exact dequantization, same layout) with an f32 KV cache.
On the F32 copy llama.cpp does not quantize activations (it does for Q4_1 products), so it
computes the same arithmetic as rrt; the difference between its two runs shows which
divergences come from llama.cpp's activation quantization.
"""
import subprocess
import tempfile
import json
import os
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

model_path, out_dir = sys.argv[1], sys.argv[2]
text_path = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")
os.makedirs(out_dir, exist_ok=True)

llm = Llama(model_path=model_path, n_ctx=1024, n_batch=512, logits_all=True, n_threads=2, verbose=False, seed=0)
f32_path = os.path.join(tempfile.mkdtemp(), "model-f32.gguf")
subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "gguf_to_f32.py"), model_path, f32_path], check=True)
# type_k / type_v 0 = GGML_TYPE_F32: no f16 rounding of the KV cache either.
llm32 = Llama(model_path=f32_path, n_ctx=1024, n_batch=512, logits_all=True, n_threads=2, verbose=False, seed=0, type_k=0, type_v=0)
meta = {"llama_cpp_python": llama_cpp.__version__, "model": os.path.basename(model_path)}

TOKENIZE = [
    "",
    "Hello world",
    " Hello  world ",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 -42 1,000,000 2026-11-26",
    "Tabs\tand\nnewlines\r\nand   multiple    spaces\n\n\n",
    "Ünïcödé: café naïve résumé Åström",
    "日本語のテキストと中文文本",
    "Emoji: 😀🚀👍🏽 and 🇫🇷 flags",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after special<|im_end|>",
    "<repo_name>smollm<file_sep>main.py",
    "don't won't can't I'm you're they've we'll she'd",
    "    leading spaces and trailing    ",
    "a\u0301 combining accent, zero\u200bwidth space, nbsp\u00a0here",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
]

tok = []
for s in TOKENIZE:
    b = s.encode("utf-8")
    tok.append({
        "text": s,
        "ids": llm.tokenize(b, add_bos=False, special=False),
        "ids_special": llm.tokenize(b, add_bos=False, special=True),
    })
json.dump({"meta": meta, "cases": tok}, open(os.path.join(out_dir, "tokenize.json"), "w"), ensure_ascii=False, indent=1)

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "To be, or not to be, that is",
    "Water boils at a temperature of",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "In machine learning, a neural network",
    "The following is a list of fruits: apple, banana,",
]
N_GEN = 32


def greedy(m, prompt_ids, n):
    m.reset()
    m.eval(prompt_ids)
    out = []
    for _ in range(n):
        logits = np.array(m.scores[m.n_tokens - 1], dtype=np.float64)
        t = int(np.argmax(logits))
        out.append(t)
        m.eval([t])
    return out


greedy_cases = []
for p in PROMPTS:
    ids = llm.tokenize(p.encode("utf-8"), add_bos=False, special=True)
    greedy_cases.append({"prompt": p, "prompt_ids": ids, "ids": greedy(llm, ids, N_GEN), "ids_f32": greedy(llm32, ids, N_GEN)})
json.dump({"meta": meta, "n_gen": N_GEN, "cases": greedy_cases}, open(os.path.join(out_dir, "greedy.json"), "w"), ensure_ascii=False, indent=1)

# Logits spot check.
ids = llm.tokenize(PROMPTS[0].encode(), add_bos=False, special=False)
llm.reset()
llm.eval(ids)
last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
top = np.argsort(-last)[:20]
llm32.reset()
llm32.eval(ids)
last32 = np.array(llm32.scores[llm32.n_tokens - 1], dtype=np.float64)
top32 = np.argsort(-last32)[:20]
json.dump({"meta": meta, "prompt_ids": ids, "top_ids": [int(i) for i in top], "top_logits": [float(last[i]) for i in top],
           "top_ids_f32": [int(i) for i in top32], "top_logits_f32": [float(last32[i]) for i in top32]},
          open(os.path.join(out_dir, "logits.json"), "w"), indent=1)

# Perplexity.
WINDOW, N_WIN = 256, 16
text = open(text_path, encoding="utf-8").read()
all_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
nll, count, per_window = 0.0, 0, []
for w in range(N_WIN):
    win = all_ids[w * WINDOW:(w + 1) * WINDOW]
    llm.reset()
    llm.eval(win)
    logits = np.array(llm.scores[:WINDOW - 1], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    lp = logits[np.arange(WINDOW - 1), win[1:]] - lse
    per_window.append(float(-lp.sum()))
    nll -= lp.sum()
    count += WINDOW - 1
json.dump({"meta": meta, "text": "tinyshakespeare.txt", "text_tokens": len(all_ids), "window": WINDOW, "windows": N_WIN,
           "scored_tokens": count, "ppl": float(np.exp(nll / count)), "window_nll": per_window,
           "first_window_ids": all_ids[:WINDOW]},
          open(os.path.join(out_dir, "perplexity.json"), "w"), indent=1)
print("wrote fixtures to", out_dir)
os.remove(f32_path)
