#!/usr/bin/env python
"""Build normfold's PaddlePaddle corpus: small Paddle models through paddle2onnx 2.1.0.

Run from the repository root with the paddle venv (bash models/rebuild.sh paddle):

    .venvs/paddle/bin/python models/paddle/export_paddle.py [name-substring ...]

Writes models/paddle/*.onnx and models/paddle/manifest.json. Weights are random with fixed seeds;
BatchNorm running statistics and every norm's scale and shift are randomized, so that no fold is
an identity. Each export runs in its own process: paddle2onnx aborts the process (SIGABRT) on some
models (those are recorded under "failed"). Outputs are checked with onnxruntime
(CPUExecutionProvider, graph optimizations disabled) against the Paddle layer on a standard normal
input. With name substrings only the matching models are rebuilt; the other entries are kept.

The variants (file name infix): plain (`_opN`: opset N asked; paddle2onnx raises it where an op
needs more, so `_op9` files may say 11); `_fp16`: the float32 export converted by paddle2onnx's
own ONNX converter (`convert_to_fp16`, what `python -m paddle2onnx.convert_to_fp16` runs: float32
inputs and outputs, Casts after them; `export(export_fp16_model=True)` writes the same float32
model as without it in 2.1.0); `_float16`: the layer cast to float16 (`.to(dtype="float16")`) and
traced with the old IR (PIR refuses a float16 conv2d on CPU); `_prim`: `dist_prim_all=True`, Paddle
decomposes batch_norm / layer_norm / group_norm into primitives before the conversion.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import paddle2onnx

OUT = Path(__file__).resolve().parent
MANIFEST = OUT / "manifest.json"
SEED = 1234


class HandRMSNorm(nn.Layer):
    """x * rsqrt(mean(x^2) + eps) * w, written by hand (as Llama-style code in Paddle does)."""

    def __init__(self, dim, eps=1e-6, pow2=False):
        super().__init__()
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Normal(1.0, 0.3))
        self.eps, self.pow2 = eps, pow2

    def forward(self, x):
        sq = paddle.pow(x, 2) if self.pow2 else x * x
        return x * paddle.rsqrt(paddle.mean(sq, axis=-1, keepdim=True) + self.eps) * self.weight


class CnnBN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.c2, self.b2 = nn.Conv2D(8, 16, 3, stride=2, bias_attr=False), nn.BatchNorm2D(16)
        self.pool = nn.MaxPool2D(2)
        self.b3 = nn.BatchNorm2D(16)  # pre-activation: after MaxPool, no linear producer
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = nn.functional.relu(self.b1(self.c1(x)))
        x = nn.functional.relu(self.b2(self.c2(x)))
        x = nn.functional.relu(self.b3(self.pool(x)))
        return self.fc(paddle.mean(x, axis=[2, 3]))


class LinearBN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.l1, self.b1, self.l2 = nn.Linear(16, 32), nn.BatchNorm1D(32), nn.Linear(32, 8)

    def forward(self, x):
        return self.l2(nn.functional.relu(self.b1(self.l1(x))))


class Block(nn.Layer):
    """Pre-LN transformer block."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d, epsilon=1e-6)
        self.attn = nn.MultiHeadAttention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class ConvGN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv2D(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.c2, self.g2 = nn.Conv2D(8, 8, 3, padding=1), nn.GroupNorm(8, 8, epsilon=1e-6)

    def forward(self, x):
        x = nn.functional.silu(self.g1(self.c1(x)))
        return self.g2(self.c2(x))


class LnMlp(nn.Layer):
    """LayerNorm -> Linear -> GELU -> LayerNorm (no attention: Paddle's MultiHeadAttention cannot be
    traced in float16 on CPU)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln1, self.fc, self.ln2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d, epsilon=1e-6)

    def forward(self, x):
        return self.ln2(nn.functional.gelu(self.fc(self.ln1(x))))


class LlamaRMSNorm(nn.Layer):
    """PaddleNLP's LlamaRMSNorm: the variance in float32, rsqrt(variance + eps) * x, cast back to the
    weight's dtype, then * weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Normal(1.0, 0.3))
        self.eps = eps

    def forward(self, x):
        h = x.astype("float32")
        variance = h.pow(2).mean(-1, keepdim=True)
        h = paddle.rsqrt(variance + self.eps) * h
        return h.astype(self.weight.dtype) * self.weight


class LlamaBlock(nn.Layer):
    def __init__(self, d=32):
        super().__init__()
        self.n1, self.fc, self.n2 = LlamaRMSNorm(d), nn.Linear(d, d, bias_attr=False), LlamaRMSNorm(d, 1e-5)

    def forward(self, x):
        return self.n2(x + self.fc(self.n1(x)))


class Conv1dBN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv1D(4, 8, 3, padding=1), nn.BatchNorm1D(8)

    def forward(self, x):
        return nn.functional.relu(self.b(self.c(x)))


class Ln2d(nn.Layer):
    """LayerNorm over the two trailing dims ([T, D])."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm([8, 32]), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(self.ln(x))


class RMSBlock(nn.Layer):
    def __init__(self, d=32):
        super().__init__()
        self.n1, self.n2 = HandRMSNorm(d), HandRMSNorm(d, eps=1e-5, pow2=True)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias_attr=False), nn.Linear(2 * d, d, bias_attr=False)

    def forward(self, x):
        x = x + self.fc2(nn.functional.silu(self.fc1(self.n1(x))))
        return self.n2(x)


# file stem -> (layer class, input shape, opset asked, variant, BNs after a linear layer, notes)
MODELS = {
    "cnn_bn_op11": (CnnBN, [1, 3, 16, 16], 11, "plain", 2,
                    "Conv -> Add(bias C[1,C,1,1]) -> Identity -> BatchNormalization -> Relu (x2, the second Conv "
                    "without bias), MaxPool -> BatchNormalization (pre-activation: left) -> Relu, mean, Linear."),
    "cnn_bn_dyn_op17": (CnnBN, [None, 3, 16, 16], 17, "plain", 2, "cnn_bn with a dynamic batch."),
    "cnn_bn_fp16_op17": (CnnBN, [1, 3, 16, 16], 17, "fp16", 2, "cnn_bn through convert_to_fp16."),
    "cnn_bn_float16_op17": (CnnBN, [1, 3, 16, 16], 17, "float16", 2, "cnn_bn cast to float16 in Paddle."),
    "cnn_bn_prim_op17": (CnnBN, [1, 3, 16, 16], 17, "prim", 2,
                         "dist_prim_all: each BN is Sub(C[C,1,1]) -> Mul -> Mul -> Add with an Identity after "
                         "every op, Relu is Max(., 0), the mean is ReduceSum / C."),
    "linear_bn1d_op11": (LinearBN, [2, 16], 11, "plain", 1, "MatMul -> Add(bias) -> BatchNormalization on [N, C]."),
    "linear_bn1d_fp16_op17": (LinearBN, [2, 16], 17, "fp16", 1, "linear_bn1d through convert_to_fp16."),
    "conv1d_bn_op11": (Conv1dBN, [1, 4, 16], 11, "plain", 1, "Conv1D -> BatchNorm1D on [N, C, L]."),
    "transformer_block_op11": (Block, [1, 8, 32], 11, "plain", 0,
                               "pre-LN block: decomposed LayerNorm with an Identity before and after."),
    "transformer_block_op17": (Block, [1, 8, 32], 17, "plain", 0, "LayerNormalization written by paddle2onnx."),
    "transformer_block_dyn_op11": (Block, [None, None, 32], 11, "plain", 0, "dynamic batch and sequence."),
    "transformer_block_fp16_op17": (Block, [1, 8, 32], 17, "fp16", 0, "through convert_to_fp16."),
    "ln_mlp_prim_op17": (LnMlp, [1, 8, 32], 17, "prim", 0, "dist_prim_all LayerNorm."),
    "ln_2d_op11": (Ln2d, [1, 8, 32], 11, "plain", 0, "LayerNorm over [T, D] (two trailing axes)."),
    "rmsnorm_hand_op11": (RMSBlock, [1, 8, 32], 11, "plain", 0, "x * rsqrt(mean(x*x) + eps) * w and the pow(2) form."),
    "rmsnorm_hand_prim_op17": (RMSBlock, [1, 8, 32], 17, "prim", 0, "rmsnorm_hand with dist_prim_all."),
    "rmsnorm_llama_op11": (LlamaBlock, [1, 8, 32], 11, "plain", 0, "PaddleNLP's LlamaRMSNorm (float32 variance)."),
    "rmsnorm_llama_fp16_op17": (LlamaBlock, [1, 8, 32], 17, "fp16", 0, "rmsnorm_llama through convert_to_fp16."),
    "conv_groupnorm_prim_op17": (ConvGN, [1, 3, 16, 16], 17, "prim", 0,
                                 "dist_prim_all GroupNorm (the plain export is not in the corpus: paddle2onnx "
                                 "2.1.0 writes its InstanceNormalization epsilon from uninitialized memory)."),
}


# What paddle2onnx 2.1.0 gets wrong on these layers, and why those exports are not in the corpus.
DEFECTS = {
    "groupnorm_epsilon": "GroupNorm -> Reshape(X, [0, G, -1]) -> InstanceNormalization(ones[G], zeros[G]) -> "
                         "Reshape -> Mul(C[C,1,1]) -> Add(C[C,1,1]) with an epsilon read from uninitialized memory "
                         "(seen: 0.0, -0.0, -9.7e-07, -6.97, 1.0, 1.3e-43 for a layer built with 1e-5 / 1e-6): "
                         "outputs change from export to export, NaN where epsilon < 0. Not in the corpus; "
                         "normfold leaves a GroupNorm with epsilon <= 0 'invalid-statistics' and keeps the "
                         "exported epsilon otherwise. The dist_prim_all export computes the right one.",
    "layernorm_2d_op17": "LayerNorm([8, 32]) at opset 17: LayerNormalization(axis=1) with scale and bias "
                         "flattened to [256]: onnxruntime refuses to run it (normfold: exit 3, the original does "
                         "not run). At opset 11 the decomposition is right (paddle_ln_2d_op11).",
    "export_fp16_model": "export(export_fp16_model=True) writes the same float32 model as without it.",
    "float16_layers": "GroupNorm and Conv1D cast to float16 abort the export (SIGABRT: 'Only support data type of "
                      "BOOL/FLOAT/DOUBLE/INT32/INT64/INT8 in Constant function'); MultiHeadAttention, LayerNorm "
                      "and pow/mean in float16 cannot be traced on CPU at all.",
    "nhwc": "Conv2D + BatchNorm2D with data_format='NHWC' abort the export (SIGABRT).",
}


def randomize(model: nn.Layer, rng):
    """Running stats and affine parameters far from identity, so no fold is a no-op."""
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, (nn.BatchNorm1D, nn.BatchNorm2D)):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.5, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.3, 2.0, c).astype("float32"))
        if isinstance(layer, (nn.BatchNorm1D, nn.BatchNorm2D, nn.LayerNorm, nn.GroupNorm)):
            shape = layer.weight.shape
            layer.weight.set_value(rng.normal(1.0, 0.3, shape).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.3, shape).astype("float32"))


def ground_truth(model: nn.Layer, after_linear: int) -> dict:
    layers = model.sublayers()
    return {
        "batchnorm": sum(isinstance(m, (nn.BatchNorm1D, nn.BatchNorm2D)) for m in layers),
        "batchnorm_after_linear": after_linear,
        "batchnorm_before_linear": 0,
        "layernorm": sum(isinstance(m, nn.LayerNorm) for m in layers),
        "rmsnorm": sum(isinstance(m, (HandRMSNorm, LlamaRMSNorm)) for m in layers),
        "groupnorm": sum(isinstance(m, nn.GroupNorm) for m in layers),
    }


def export(model, shape, dtype, path: Path, opset: int, variant: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/m"
        spec = paddle.static.InputSpec(list(shape), dtype, "x")
        # PIR's dtype check refuses a float16 conv2d on CPU; the old IR traces it (a .pdmodel)
        with paddle.pir_utils.OldIrGuard() if dtype == "float16" else contextlib.nullcontext():
            paddle.jit.save(model, prefix, input_spec=[spec])
        model_file = prefix + (".json" if Path(prefix + ".json").exists() else ".pdmodel")
        paddle2onnx.export(model_file, prefix + ".pdiparams", str(path), opset_version=opset,
                           dist_prim_all=variant == "prim")
    if variant == "fp16" and path.exists():
        import paddle2onnx.paddle2onnx_cpp2py_export as c_p2o

        c_p2o.convert_to_fp16(str(path), str(path), False)  # (input, output, verbose)


def compare(model, x, path: Path) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = x.astype(np.float16) if "float16" in sess.get_inputs()[0].type else x
    got = sess.run(None, {sess.get_inputs()[0].name: feed})[0].astype(np.float32)
    want = model(paddle.to_tensor(x)).numpy().astype(np.float32)
    return float(np.max(np.abs(got - want)))


def export_one(stem: str) -> dict:
    """Export one model; its manifest entry as JSON on stdout's last line."""
    import onnx

    build, shape, opset, variant, after_linear, notes = MODELS[stem]
    paddle.seed(SEED)
    model = build()
    randomize(model, np.random.default_rng(SEED))
    model.eval()
    dtype = "float16" if variant == "float16" else "float32"
    path = OUT / f"paddle_{stem}.onnx"
    export(model.to(dtype="float16") if variant == "float16" else model, shape, dtype, path, opset, variant)
    m = onnx.load(path)
    concrete = [d if d is not None else 2 for d in shape]
    x = np.random.default_rng(SEED + 1).normal(0, 1, concrete).astype("float32")
    return {"file": path.name, "source": f"{build.__name__} in export_paddle.py", "exporter": "paddle2onnx",
            "variant": variant, "opset_asked": opset,
            "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "dtype": "float16" if variant in ("fp16", "float16") else "float32",
            "inputs": {i.name: {"shape": concrete, "dtype": dtype} for i in m.graph.input},
            "ground_truth": ground_truth(model, after_linear),
            "ort_vs_paddle_max_abs_diff": float(f"{compare(model.to(dtype='float32'), x, path):.3g}"),
            "size_bytes": path.stat().st_size, "notes": notes}


def main(filters):
    old = {e["file"]: e for e in json.loads(MANIFEST.read_text())["models"]} if MANIFEST.exists() else {}
    failed = json.loads(MANIFEST.read_text()).get("failed", {}) if MANIFEST.exists() else {}
    for stem in MODELS:
        if filters and not any(f in stem for f in filters):
            continue
        r = subprocess.run([sys.executable, __file__, "--one", stem], capture_output=True, text=True)
        if r.returncode == 0:
            entry = json.loads(r.stdout.strip().splitlines()[-1])
            old[entry["file"]], _ = entry, failed.pop(stem, None)
        else:
            errors = [ln for ln in r.stderr.splitlines() if "rror" in ln]
            failed[stem] = f"exit {r.returncode}: " + " | ".join(errors[-2:])[:300]
            old.pop(f"paddle_{stem}.onnx", None)
        print(stem, "ok" if r.returncode == 0 else failed[stem], flush=True)
    order = {f"paddle_{s}.onnx": i for i, s in enumerate(MODELS)}
    manifest = {"generator": "models/paddle/export_paddle.py", "paddlepaddle": paddle.__version__,
                "paddle2onnx": paddle2onnx.__version__, "seed": SEED,
                "comparison": "onnxruntime CPU with ORT_DISABLE_ALL vs the Paddle layer in eval mode (float32)",
                "ground_truth_convention": "counts of Paddle layers by class over model.sublayers(): batchnorm = "
                                           "BatchNorm1D/2D, layernorm = LayerNorm, rmsnorm = the hand-written "
                                           "HandRMSNorm and LlamaRMSNorm, groupnorm = GroupNorm; "
                                           "batchnorm_after_linear = BNs whose input is a Conv/Linear output read "
                                           "by nothing else (by construction per model).",
                "paddle2onnx_defects": DEFECTS,
                "models": sorted(old.values(), key=lambda e: order.get(e["file"], 999)), "failed": failed}
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(export_one(sys.argv[2])))
    else:
        main(sys.argv[1:])
