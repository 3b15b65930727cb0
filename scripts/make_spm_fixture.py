#!/usr/bin/env python3
"""A tiny SentencePiece-style ("llama" tokenizer model) vocabulary GGUF and llama.cpp's
tokenizations with it, to test rrt's SPM tokenizer built from GGUF metadata.

    python3 scripts/make_spm_fixture.py ../shared/data/tinyshakespeare.txt fixtures/gguf

The vocabulary is trained like SentencePiece's BPE: characters, then 400 merges of the most
frequent adjacent pair within "▁"-prefixed words, each new piece scored by -(merge index);
plus <unk>, <s>, </s> and the 256 byte-fallback pieces <0x00>..<0xFF>.
"""
import collections
import json
import os
import sys

from gguf import GGUFWriter
from llama_cpp import Llama

text_path, out = sys.argv[1], sys.argv[2]
text = open(text_path, encoding="utf-8").read()[:200000]
words = collections.Counter("▁" + w for w in text.replace("\n", " ").split(" ") if w)
seqs = {w: list(w) for w in words}
chars = sorted({c for w in words for c in w})
pieces = {c: 0.0 for c in chars}
for i in range(400):
    pairs = collections.Counter()
    for w, s in seqs.items():
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] += words[w]
    if not pairs:
        break
    (a, b), _ = pairs.most_common(1)[0]
    new = a + b
    pieces.setdefault(new, -float(i + 1))
    for w, s in seqs.items():
        j, t = 0, []
        while j < len(s):
            if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                t.append(new)
                j += 2
            else:
                t.append(s[j])
                j += 1
        seqs[w] = t

tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
types = [2, 3, 3] + [6] * 256
scores = [0.0, 0.0, 0.0] + [0.0] * 256
for p, s in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
    if p in tokens:
        continue
    tokens.append(p)
    types.append(1)
    scores.append(s - 1000.0 if len(p) == 1 else s)

path = os.path.join(out, "spm_vocab.gguf")
w = GGUFWriter(path, "llama")
w.add_block_count(1)
w.add_context_length(128)
w.add_embedding_length(8)
w.add_feed_forward_length(8)
w.add_head_count(1)
w.add_layer_norm_rms_eps(1e-5)
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)
w.add_add_bos_token(True)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

llm = Llama(model_path=path, vocab_only=True, verbose=False)
CASES = [
    "First Citizen:", "Before we proceed any further, hear me speak.", "  two  spaces", "trailing ",
    "new\nline", "ünïcödé café", "日本", "😀", "1234 5678", "You are all resolved rather to die than to famish?",
    "", "a", "What say you?\n\nAll:\nSpeak, speak.", "tab\there",
]
cases = [{"text": s, "ids": llm.tokenize(s.encode(), add_bos=True, special=False)} for s in CASES]
json.dump({"vocab": len(tokens), "cases": cases}, open(os.path.join(out, "spm_tokenize.json"), "w"), ensure_ascii=False, indent=1)
print("wrote", path, len(tokens), "tokens")
