#!/usr/bin/env python3
"""Build the large random-weight models the peer benchmark uses (no torch needed).

    python bench/make_large_models.py [OUT_DIR]        # default /work/bench-data

Writes, deterministically (fixed seeds, same bytes every run):
  conv_bn_stack_op13.onnx      a deep Conv(3x3, 512 ch) -> BatchNormalization -> Relu stack, opset 13,
                               BN in inference mode with random statistics (~400 MB)
  transformer_ln_ts_op17.onnx  a pre-LN transformer encoder (MatMul+Add blocks, multi-head attention,
                               erf-GELU FFN) whose LayerNorms are in the TorchScript exporter's
                               decomposed spelling, opset 17 (~400 MB)
Both are below 2 GB and saved as one file (no external data). Do not write them into the repo.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


class Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs


def conv_bn_stack(layers: int = 44, channels: int = 512, hw: int = 7, seed: int = 1234) -> onnx.ModelProto:
    """Conv(3x3, pad 1) -> BatchNormalization -> Relu, `layers` times, then GlobalAveragePool."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = "input"
    cin = 3
    for i in range(layers):
        cout = channels
        std = np.sqrt(2.0 / (cin * 9))
        w = b.const(f"conv{i}.weight", (rng.standard_normal((cout, cin, 3, 3)) * std).astype(np.float32))
        inputs = [x, w]
        if i % 2 == 1:  # half the convs have a bias, half not (as with bias=False before a BN)
            inputs.append(b.const(f"conv{i}.bias", (rng.standard_normal(cout) * 0.01).astype(np.float32)))
        y = b.node("Conv", inputs, f"/layer{i}/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                   strides=[1, 1], dilations=[1, 1], group=1)
        scale = b.const(f"bn{i}.weight", rng.uniform(0.5, 1.5, cout).astype(np.float32))
        bias = b.const(f"bn{i}.bias", (rng.standard_normal(cout) * 0.1).astype(np.float32))
        mean = b.const(f"bn{i}.running_mean", (rng.standard_normal(cout) * 0.1).astype(np.float32))
        var = b.const(f"bn{i}.running_var", rng.uniform(0.5, 1.5, cout).astype(np.float32))
        y = b.node("BatchNormalization", [y, scale, bias, mean, var], f"/layer{i}/bn/BatchNormalization",
                   epsilon=1e-5, momentum=0.9)
        x = b.node("Relu", [y], f"/layer{i}/relu/Relu")
        cin = cout
    out = b.node("GlobalAveragePool", [x], "/pool/GlobalAveragePool")
    b.nodes[-1].output[0] = "output"
    graph = helper.make_graph(b.nodes, "conv_bn_stack",
                              [helper.make_tensor_value_info("input", F, [1, 3, hw, hw])],
                              [helper.make_tensor_value_info("output", F, [1, cin, 1, 1])], b.inits)
    del out
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="normfold-bench", producer_version="1")
    model.ir_version = 8
    return model


def layernorm_ts(b: Builder, x: str, prefix: str, dim: int, rng: np.random.Generator) -> str:
    """TorchScript exporter's LayerNorm at opset <= 16 (manifest spelling layernorm/torchscript_op<=16)."""
    mean = b.node("ReduceMean", [x], f"{prefix}/ReduceMean", axes=[-1])
    d = b.node("Sub", [x, mean], f"{prefix}/Sub")
    two = b.const(f"{prefix}/Constant_2", np.array(2.0, np.float32))
    sq = b.node("Pow", [d, two], f"{prefix}/Pow")
    var = b.node("ReduceMean", [sq], f"{prefix}/ReduceMean_1", axes=[-1])
    eps = b.const(f"{prefix}/Constant_eps", np.array(1e-5, np.float32))
    ve = b.node("Add", [var, eps], f"{prefix}/Add")
    sd = b.node("Sqrt", [ve], f"{prefix}/Sqrt")
    n = b.node("Div", [d, sd], f"{prefix}/Div")
    gamma = b.const(f"{prefix}.weight", rng.uniform(0.5, 1.5, dim).astype(np.float32))
    beta = b.const(f"{prefix}.bias", (rng.standard_normal(dim) * 0.1).astype(np.float32))
    g = b.node("Mul", [n, gamma], f"{prefix}/Mul")
    return b.node("Add", [g, beta], f"{prefix}/Add_1")


def linear(b: Builder, x: str, prefix: str, din: int, dout: int, rng: np.random.Generator) -> str:
    w = b.const(f"{prefix}.weight", (rng.standard_normal((din, dout)) / np.sqrt(din)).astype(np.float32))
    bias = b.const(f"{prefix}.bias", (rng.standard_normal(dout) * 0.02).astype(np.float32))
    y = b.node("MatMul", [x, w], f"{prefix}/MatMul")
    return b.node("Add", [bias, y], f"{prefix}/Add")  # TorchScript writes Add(bias, MatMul)


def transformer(layers: int = 8, dim: int = 1024, heads: int = 16, ffn: int = 4096, seq: int = 64,
                seed: int = 4321) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b = Builder()
    hd = dim // heads
    split_shape = b.const("shape_split", np.array([1, seq, heads, hd], np.int64))
    merge_shape = b.const("shape_merge", np.array([1, seq, dim], np.int64))
    scale = b.const("attn_scale", np.array(1.0 / np.sqrt(hd), np.float32))
    sqrt2 = b.const("gelu_sqrt2", np.array(np.sqrt(2.0), np.float32))
    one = b.const("gelu_one", np.array(1.0, np.float32))
    half = b.const("gelu_half", np.array(0.5, np.float32))
    x = "input"
    for i in range(layers):
        p = f"/encoder/layer.{i}"
        h = layernorm_ts(b, x, f"{p}/ln1", dim, rng)
        q, k, v = (linear(b, h, f"{p}/attn/{n}", dim, dim, rng) for n in ("q", "k", "v"))
        q = b.node("Transpose", [b.node("Reshape", [q, split_shape], f"{p}/attn/q/Reshape")],
                   f"{p}/attn/q/Transpose", perm=[0, 2, 1, 3])
        k = b.node("Transpose", [b.node("Reshape", [k, split_shape], f"{p}/attn/k/Reshape")],
                   f"{p}/attn/k/Transpose", perm=[0, 2, 3, 1])
        v = b.node("Transpose", [b.node("Reshape", [v, split_shape], f"{p}/attn/v/Reshape")],
                   f"{p}/attn/v/Transpose", perm=[0, 2, 1, 3])
        s = b.node("Mul", [b.node("MatMul", [q, k], f"{p}/attn/MatMul"), scale], f"{p}/attn/Mul")
        a = b.node("Softmax", [s], f"{p}/attn/Softmax", axis=-1)
        c = b.node("MatMul", [a, v], f"{p}/attn/MatMul_1")
        c = b.node("Reshape", [b.node("Transpose", [c], f"{p}/attn/Transpose", perm=[0, 2, 1, 3]), merge_shape],
                   f"{p}/attn/Reshape")
        o = linear(b, c, f"{p}/attn/o", dim, dim, rng)
        x = b.node("Add", [x, o], f"{p}/Add")
        h = layernorm_ts(b, x, f"{p}/ln2", dim, rng)
        h = linear(b, h, f"{p}/ffn/fc1", dim, ffn, rng)
        e = b.node("Erf", [b.node("Div", [h, sqrt2], f"{p}/ffn/gelu/Div")], f"{p}/ffn/gelu/Erf")
        h = b.node("Mul", [b.node("Mul", [h, b.node("Add", [e, one], f"{p}/ffn/gelu/Add")], f"{p}/ffn/gelu/Mul"),
                           half], f"{p}/ffn/gelu/Mul_1")
        h = linear(b, h, f"{p}/ffn/fc2", ffn, dim, rng)
        x = b.node("Add", [x, h], f"{p}/Add_1")
    layernorm_ts(b, x, "/final_ln", dim, rng)
    b.nodes[-1].output[0] = "output"
    graph = helper.make_graph(b.nodes, "transformer_ln_ts",
                              [helper.make_tensor_value_info("input", F, [1, seq, dim])],
                              [helper.make_tensor_value_info("output", F, [1, seq, dim])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="normfold-bench", producer_version="1")
    model.ir_version = 8
    return model


MODELS = {
    "conv_bn_stack_op13.onnx": conv_bn_stack,
    "transformer_ln_ts_op17.onnx": transformer,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="/work/bench-data")
    ap.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    repo = Path(__file__).resolve().parents[1]
    if out.resolve() == repo or repo in out.resolve().parents:
        print(f"refusing to write large models inside the repo ({repo})", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for name, build in MODELS.items():
        path = out / name
        if path.exists() and not args.force:
            print(f"{path}: exists ({path.stat().st_size / 1e6:.1f} MB); --force rebuilds")
            continue
        model = build()
        onnx.checker.check_model(model)
        tmp = path.with_suffix(".tmp")
        onnx.save(model, tmp)
        os.replace(tmp, path)
        n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {len(model.graph.node)} nodes, "
              f"{len(model.graph.initializer)} initializers, opset {model.opset_import[0].version}, "
              f"{n_bn} BatchNormalization")
    return 0


if __name__ == "__main__":
    sys.exit(main())
