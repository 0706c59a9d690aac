#!/usr/bin/env python3
"""Build an ONNX graph of a BERT encoder (e.g. sentence-transformers/all-MiniLM-L6-v2) straight from its
safetensors weights and config.json, with the `onnx` package's helper API: no torch, no download.

Inputs  input_ids, attention_mask, token_type_ids: int64 [batch, sequence]
Output  last_hidden_state: float32 [batch, sequence, hidden]

usage: bert_to_onnx.py MODEL_DIR OUT.onnx     (MODEL_DIR holds model.safetensors and config.json)
Needs numpy and onnx only (safetensors is parsed by hand: 8-byte header length, JSON header, raw data).
"""
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization is an ONNX op from opset 17 on
IR_VERSION = 8


def read_safetensors(path):
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name.removeprefix("bert.")] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
    return out


def build(model_dir):
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    w = read_safetensors(model_dir / "model.safetensors")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    assert cfg.get("hidden_act", "gelu") == "gelu", "only exact (erf) GELU is built"
    assert cfg.get("position_embedding_type", "absolute") == "absolute"

    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(name, values, dtype):
        return init(name, np.array(values, dtype=dtype))

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x, prefix, out):
        # torch Linear: y = x W^T + b; store W^T so the graph is a plain MatMul + Add.
        wt = init(prefix + ".weight_t", w[prefix + ".weight"].T)
        b = init(prefix + ".bias", w[prefix + ".bias"])
        return node("Add", [node("MatMul", [x, wt], out + "/matmul"), b], out)

    def layer_norm(x, prefix, out):
        g = init(prefix + ".weight", w[prefix + ".weight"])
        b = init(prefix + ".bias", w[prefix + ".bias"])
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=eps)

    # Embeddings: word + position + token type, then LayerNorm.
    word = node("Gather", [init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"], "emb/word")
    tok = node("Gather", [init("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"], "emb/type")
    # Positions 0..T-1: slice the first T rows of the position table. (A scalar Shape->Gather->Range here is
    # miscompiled by onnxruntime's EXTENDED-level fusions: "Slice ... Starts must be a 1-D array".)
    seq = node("Shape", ["input_ids"], "emb/seq_len", start=1, end=2)  # [1] = [T]
    zero = const("c/zero", [0], np.int64)
    pos = node("Slice", [init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]), zero, seq, zero], "emb/pos")  # [T,H]
    emb = node("Add", [node("Add", [word, tok], "emb/word_type"), pos], "emb/sum")
    h = layer_norm(emb, "embeddings.LayerNorm", "emb/out")

    # Additive attention mask [B,1,1,T]: 0 where attended, float32 lowest where padded (as transformers does).
    mask_f = node("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    inv = node("Sub", [const("c/onef", 1.0, np.float32), mask_f], "mask/inv")
    neg = node("Mul", [inv, const("c/minf", np.finfo(np.float32).min, np.float32)], "mask/neg")
    add_mask = node("Unsqueeze", [neg, const("c/axes12", [1, 2], np.int64)], "mask/add")

    split_shape = const("c/split_heads", [0, 0, heads, head_dim], np.int64)
    merge_shape = const("c/merge_heads", [0, 0, hidden], np.int64)
    scale = const("c/scale", 1.0 / math.sqrt(head_dim), np.float32)
    half = const("c/half", 0.5, np.float32)

    for i in range(cfg["num_hidden_layers"]):
        p, o = f"encoder.layer.{i}", f"l{i}"
        q = node("Reshape", [linear(h, p + ".attention.self.query", o + "/q"), split_shape], o + "/q4")
        k = node("Reshape", [linear(h, p + ".attention.self.key", o + "/k"), split_shape], o + "/k4")
        v = node("Reshape", [linear(h, p + ".attention.self.value", o + "/v"), split_shape], o + "/v4")
        q = node("Transpose", [q], o + "/qt", perm=[0, 2, 1, 3])  # [B,h,T,d]
        k = node("Transpose", [k], o + "/kt", perm=[0, 2, 3, 1])  # [B,h,d,T]
        v = node("Transpose", [v], o + "/vt", perm=[0, 2, 1, 3])  # [B,h,T,d]
        scores = node("Mul", [node("MatMul", [q, k], o + "/qk"), scale], o + "/scores")
        probs = node("Softmax", [node("Add", [scores, add_mask], o + "/masked")], o + "/probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], o + "/ctx4")], o + "/ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], o + "/ctx")
        attn = linear(ctx, p + ".attention.output.dense", o + "/attn_out")
        h = layer_norm(node("Add", [attn, h], o + "/attn_res"), p + ".attention.output.LayerNorm", o + "/attn_ln")
        inter = linear(h, p + ".intermediate.dense", o + "/inter")
        # GELU (erf) as 0.5 * x * (1 + erf(x / sqrt2)), in the shape onnxruntime fuses into BiasGelu.
        erf = node("Erf", [node("Div", [inter, const(o + "/sqrt2", math.sqrt(2.0), np.float32)], o + "/gelu_div")], o + "/gelu_erf")
        gelu = node("Mul", [node("Mul", [inter, node("Add", [erf, const(o + "/c1", 1.0, np.float32)], o + "/gelu_1p")], o + "/gelu_x"), half], o + "/gelu")
        out = linear(gelu, p + ".output.dense", o + "/ffn_out")
        h = layer_norm(node("Add", [out, h], o + "/ffn_res"), p + ".output.LayerNorm", o + "/out")

    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="last_hidden_state"))
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "bert_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims + [hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="maas bert_to_onnx")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    m = build(sys.argv[1])
    onnx.save(m, sys.argv[2])
    print(f"wrote {sys.argv[2]} ({Path(sys.argv[2]).stat().st_size} bytes, {len(m.graph.node)} nodes)", file=sys.stderr)
