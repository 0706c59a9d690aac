#!/usr/bin/env python3
"""Check an ONNX BERT export (bert_to_onnx.py) against (1) the project's torch reference embeddings
(tests/data/minilm-reference.json) and (2) a float64 numpy BERT computed from the same safetensors, then
time onnxruntime with 1 intra-op thread on a batch of 32 x 13-token sentences.

usage: check_parity.py MODEL_DIR MODEL.onnx REFERENCE.json
"""
import json
import sys
import time
from math import erf

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bert_to_onnx import read_safetensors  # noqa: E402

model_dir, onnx_path, ref_path = sys.argv[1:4]
cfg = json.load(open(f"{model_dir}/config.json"))
W = {k: v.astype(np.float64) for k, v in read_safetensors(f"{model_dir}/model.safetensors").items()}
verf = np.vectorize(erf)


def ln(x, p, eps=cfg["layer_norm_eps"]):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * W[p + ".weight"] + W[p + ".bias"]


def lin(x, p):
    return x @ W[p + ".weight"].T + W[p + ".bias"]


def numpy_bert(ids, mask, types):
    B, T = ids.shape
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    d = H // nh
    h = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:T] + W["embeddings.token_type_embeddings.weight"][types]
    h = ln(h, "embeddings.LayerNorm")
    add = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        split = lambda x: x.reshape(B, T, nh, d).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(h, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + add
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
        h = ln(lin(ctx, f"{p}.attention.output.dense") + h, f"{p}.attention.output.LayerNorm")
        x = lin(h, f"{p}.intermediate.dense")
        x = 0.5 * x * (1 + verf(x / np.sqrt(2)))
        h = ln(lin(x, f"{p}.output.dense") + h, f"{p}.output.LayerNorm")
    return h


def pool_norm(hidden, mask):
    m = mask[..., None].astype(hidden.dtype)
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def pad(rows):
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask, np.zeros_like(ids)


so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
for x in sess.get_inputs() + sess.get_outputs():
    print(f"  {x.name}: {x.type} {x.shape}")


def run(ids, mask, types):
    return sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]


# (1) the project's torch reference, unbatched and as one padded batch.
ref = json.load(open(ref_path))
want = np.array(ref["embeddings"])
for i, toks in enumerate(ref["token_ids"]):
    ids, mask, types = pad([toks])
    got = pool_norm(run(ids, mask, types), mask)[0]
    print(f"ref row {i} unbatched: max|onnx - torch ref| = {np.abs(got - want[i]).max():.3e}")
ids, mask, types = pad(ref["token_ids"])
got = pool_norm(run(ids, mask, types), mask)
print(f"ref rows padded batch: max|onnx - torch ref| = {np.abs(got - want).max():.3e}")

# (2) float64 numpy BERT from the same weights, on a few tokenized sentences (padded batch).
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
texts = ["hello world", "The quick brown fox jumps over the lazy dog",
         "ONNX Runtime runs the exported encoder.", "A much longer sentence, with punctuation; numbers 12345 and UPPER case words, to exercise padding."]
rows = [e.ids for e in tok.encode_batch(texts)]
ids, mask, types = pad(rows)
h64 = numpy_bert(ids, mask, types)
h32 = run(ids, mask, types)
hid_diff = np.abs(h32 - h64)[mask.astype(bool)].max()
print(f"numpy f64 vs onnx: last_hidden_state max diff (unpadded positions) = {hid_diff:.3e}; "
      f"embedding max diff = {np.abs(pool_norm(h32, mask) - pool_norm(h64, mask)).max():.3e}")
print(f"numpy f64 vs torch ref: {np.abs(pool_norm(numpy_bert(*pad(ref['token_ids'])), pad(ref['token_ids'])[1]) - want).max():.3e}")

# (3) timing: batch 32 of 13-token sentences, 1 intra-op thread.
rng = np.random.default_rng(0)
ids = np.concatenate([np.full((32, 1), 101), rng.integers(1000, 29000, (32, 11)), np.full((32, 1), 102)], 1).astype(np.int64)
mask = np.ones_like(ids)
types = np.zeros_like(ids)
for _ in range(3):
    run(ids, mask, types)
ts = []
for _ in range(20):
    t = time.perf_counter()
    run(ids, mask, types)
    ts.append(time.perf_counter() - t)
print(f"ORT {ort.__version__} 1 thread, batch 32x13: median {np.median(ts) * 1e3:.1f} ms, min {min(ts) * 1e3:.1f} ms")
