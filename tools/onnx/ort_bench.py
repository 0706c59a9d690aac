#!/usr/bin/env python3
"""Time ONNX Runtime on its own: one BERT export, a batch of copies of one sentence, as many
runs as fit in SECONDS; prints one JSON object (median and p90 of a batch, sentences/s).

usage: ort_bench.py TOKENIZER.json MODEL.onnx TEXT [BATCH=32] [SECONDS=8] [THREADS=1]

Needs the Python packages `onnxruntime` and `tokenizers` (scripts/bench-encoders installs the
pinned versions into .venv-clients).
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

tok_path, model_path, text = sys.argv[1:4]
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 32
seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 8.0
threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1

tokenizer = Tokenizer.from_file(tok_path)
tokenizer.no_padding()  # the file pads to 128; maas pads a batch to its longest row
ids = tokenizer.encode(text).ids
feed = {
    "input_ids": np.array([ids] * batch, dtype=np.int64),
    "attention_mask": np.ones((batch, len(ids)), dtype=np.int64),
    "token_type_ids": np.zeros((batch, len(ids)), dtype=np.int64),
}
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
for _ in range(3):
    sess.run(None, feed)
times = []
start = time.perf_counter()
while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    sess.run(None, feed)
    times.append(time.perf_counter() - t)
times.sort()
median = times[len(times) // 2]
print(json.dumps({
    "onnxruntime": ort.__version__,
    "threads": threads,
    "batch": batch,
    "tokens": len(ids),
    "runs": len(times),
    "batch_ms_p50": round(median * 1e3, 2),
    "batch_ms_p90": round(times[len(times) * 9 // 10] * 1e3, 2),
    "sentences_per_s": round(batch / median, 1),
}))
