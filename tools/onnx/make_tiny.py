# Tiny ONNX model: y = x @ W + b (float32 [batch,3] -> [batch,2]); n = ReduceSum(ids, axis=1) (int64 [B,T] -> [B]).
import numpy as np, onnx, sys
from onnx import helper, TensorProto, numpy_helper
W = np.array([[1, 2], [3, 4], [5, 6]], np.float32); b = np.array([0.5, -0.5], np.float32)
g = helper.make_graph(
    [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
     helper.make_node("ReduceSum", ["ids", "axes"], ["n"], keepdims=0)],
    "tiny",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
     helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
     helper.make_tensor_value_info("n", TensorProto.INT64, ["B"])],
    [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="maas-tiny")
m.ir_version = 8
onnx.checker.check_model(m)
onnx.save(m, sys.argv[1] if len(sys.argv) > 1 else "tiny.onnx")
