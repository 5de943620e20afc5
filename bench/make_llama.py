"""Build a Llama-shaped fp16 decoder with external data, written streaming (never whole in memory).

    python bench/make_llama.py OUT_DIR [--layers 6] [--width 4096] [--ffn 11008] [--vocab 32000]

Writes OUT_DIR/llama.onnx and OUT_DIR/llama.onnx.data (6 layers at width 4096: about 2.9 GB; 16
layers: 7 GB; 40 layers: 17 GB). Each RMSNorm is spelled as TorchScript writes an fp16 Llama's
(opset 14, no RMSNormalization op): Cast(f32) -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt ->
Reciprocal -> Mul -> Cast(f16) -> Mul(weight). Attention (no mask) and the SiLU MLP are plain
MatMuls. Weights are N(0, 0.02) fp16 drawn from one seeded pool (cheap to generate, different
slices for every tensor), so the model runs with sane activations.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096
POOL = 1 << 24  # fp16 values in the random pool (32 MB)


class Writer:
    """Initializers appended to one external data file as they are made."""

    def __init__(self, folder: str, name: str):
        self.location = name
        self.file = open(os.path.join(folder, name), "wb")
        self.offset = 0
        self.inits: list[onnx.TensorProto] = []
        rng = np.random.default_rng(0)
        self.pool = (rng.standard_normal(2 * POOL, dtype=np.float32) * 0.02).astype(np.float16)
        self.count = 0

    def add(self, name: str, shape: list[int], value: np.ndarray | None = None) -> str:
        t = onnx.TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT16
        t.dims.extend(shape)
        n = int(np.prod(shape))
        pad = (-self.offset) % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        if value is not None:
            self.file.write(value.astype(np.float16).tobytes())
        else:
            written = 0
            while written < n:
                self.count += 1
                shift = (self.count * 7919) % POOL
                chunk = min(POOL, n - written)
                self.file.write(self.pool[shift:shift + chunk].tobytes())
                written += chunk
        self.offset += 2 * n
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.location), ("offset", str(start)), ("length", str(2 * n))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        self.inits.append(t)
        return name

    def close(self) -> None:
        self.file.close()


def build(folder: str, layers: int = 6, width: int = 4096, ffn: int = 11008, vocab: int = 32000,
          heads: int = 32, name: str = "llama.onnx") -> str:
    os.makedirs(folder, exist_ok=True)
    w = Writer(folder, name + ".data")
    nodes: list[onnx.NodeProto] = []
    small: list[onnx.TensorProto] = []
    counter = [0]

    def node(op, inputs, **attrs):
        counter[0] += 1
        out = f"t{counter[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"/{op}_{counter[0]}", **attrs))
        return out

    def const(name, value):
        small.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    two, eps = const("pow_two", np.array(2.0, np.float32)), const("eps", np.array(1e-6, np.float32))
    head_dim = width // heads
    heads_shape = const("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, width], np.int64))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float16))

    def rmsnorm(x, weight):
        xf = node("Cast", [x], to=TensorProto.FLOAT)
        var = node("ReduceMean", [node("Pow", [xf, two])], axes=[-1], keepdims=1)
        inv = node("Reciprocal", [node("Sqrt", [node("Add", [var, eps])])])
        return node("Mul", [weight, node("Cast", [node("Mul", [xf, inv])], to=TensorProto.FLOAT16)])

    h = node("Gather", [w.add("embed_tokens.weight", [vocab, width]), "input_ids"])
    ones = np.ones(width, np.float16)
    for i in range(layers):
        p = f"layers.{i}."
        n1 = rmsnorm(h, w.add(p + "input_layernorm.weight", [width], ones))
        q, k, v = (node("Transpose", [node("Reshape", [node("MatMul", [n1, w.add(p + f"self_attn.{x}_proj.weight",
                                                                              [width, width])]), heads_shape])],
                        perm=[0, 2, 1, 3]) for x in "qkv")
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        attn = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        merged = node("Reshape", [node("Transpose", [attn], perm=[0, 2, 1, 3]), merge_shape])
        h = node("Add", [h, node("MatMul", [merged, w.add(p + "self_attn.o_proj.weight", [width, width])])])
        n2 = rmsnorm(h, w.add(p + "post_attention_layernorm.weight", [width], ones))
        gate = node("MatMul", [n2, w.add(p + "mlp.gate_proj.weight", [width, ffn])])
        up = node("MatMul", [n2, w.add(p + "mlp.up_proj.weight", [width, ffn])])
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate])]), up])
        h = node("Add", [h, node("MatMul", [act, w.add(p + "mlp.down_proj.weight", [ffn, width])])])
    node("MatMul", [rmsnorm(h, w.add("norm.weight", [width], ones)), w.add("lm_head.weight", [width, vocab])])
    w.close()
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(nodes, "llama",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])],
                              small + w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8,
                              producer_name="normfold bench/make_llama.py")
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    if os.path.realpath(args.out_dir).startswith(os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))):
        sys.exit("write the model outside the repository")
    t = time.perf_counter()
    path = build(args.out_dir, args.layers, args.width, args.ffn, args.vocab)
    size = os.path.getsize(path + ".data")
    print(f"{path}: {args.layers} layers, width {args.width}, {size / 2**30:.2f} GiB external data, "
          f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
