#!/usr/bin/env python
"""Build normfold's real-model ONNX test corpus from PyTorch / transformers model code.

Run from the repository root with the torch venv:

    /work/venvs/torch/bin/python models/torch/export_torch.py [name-substring ...]

Writes models/torch/*.onnx and models/torch/manifest.json. Every transformers model is built
from a config with random weights (no model hub access). Seeds are fixed per model, so a rebuild
gives the same weights. Normalization parameters (BN running stats, LN/RMSNorm/GroupNorm affine
parameters) are randomized so that folding / fusing mistakes change the outputs.

With name substrings on the command line only the matching models are rebuilt; the manifest
entries of the others are kept.

Input specs in the manifest: integer inputs are drawn uniformly from [low, high) (numpy
randint semantics, high exclusive); float inputs are standard normal. Outputs of the ONNX file
are checked with onnxruntime (CPUExecutionProvider, graph optimizations disabled) against the
PyTorch module on those inputs.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

OUT = Path(__file__).resolve().parent
MANIFEST = OUT / "manifest.json"
TS = "torchscript"
DY = "dynamo"
PRESERVE = torch.onnx.TrainingMode.PRESERVE
EVAL = torch.onnx.TrainingMode.EVAL


# ----------------------------------------------------------------------------------------------
# hand-written models
# ----------------------------------------------------------------------------------------------
class CnnBn(nn.Module):
    """Small CNN covering the BatchNorm folding cases.

    BN modules (9), the ones marked * directly consume a sole-use Conv/ConvT/Linear output:
      bn1*  Conv2d(3->16, bias=False) -> BN
      bn2*  Conv2d(16->16, bias=True) -> BN
      bn3*  depthwise Conv2d(16->16, groups=16, bias=False) -> BN
      bn4*  grouped Conv2d(16->32, groups=2, bias=True) -> BN
      bn5   Conv2d(32->32) output feeds BN *and* a residual Add  (must NOT be folded)
      bn6   BN after ReLU (no linear producer)
      bn7*  ConvTranspose2d(32->16, groups=2, stride 2) -> BN
      bn8*  Linear(16->24) -> BatchNorm1d   (Gemm)
      bn9   BatchNorm1d after ReLU            (no linear producer)
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2, bias=True)
        self.bn4 = nn.BatchNorm2d(32)
        self.shared = nn.Conv2d(32, 32, 1, bias=True)
        self.bn5 = nn.BatchNorm2d(32)
        self.bn6 = nn.BatchNorm2d(32)
        self.convt = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True)
        self.bn7 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 24)
        self.bn8 = nn.BatchNorm1d(24)
        self.bn9 = nn.BatchNorm1d(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.dw(x)))
        x = F.relu(self.bn4(self.gconv(x)))
        s = self.shared(x)                    # used twice: BN input and residual
        x = F.relu(self.bn5(s)) + s
        x = self.bn6(F.relu(x))               # BN after ReLU
        x = F.relu(self.bn7(self.convt(x)))
        x = x.mean(dim=(2, 3))
        x = self.bn8(self.fc(x))
        x = self.bn9(F.relu(x))
        return self.head(x)


class Conv1d3dBn(nn.Module):
    """Conv1d -> BatchNorm1d (on [N,C,L]) and Conv3d -> BatchNorm3d; both folding candidates."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm1d(8)
        self.c1b = nn.Conv1d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b1b = nn.BatchNorm1d(8)
        self.c3 = nn.Conv3d(2, 8, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm3d(8)

    def forward(self, seq, vol):
        a = F.relu(self.b1(self.c1(seq)))
        a = F.relu(self.b1b(self.c1b(a)))
        b = F.relu(self.b3(self.c3(vol)))
        return a, b


class ConvGroupNorm(nn.Module):
    """Conv -> GroupNorm(4, 16) -> SiLU -> Conv -> GroupNorm(2, 16) -> SiLU (diffusion-UNet-style)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(num_groups=4, num_channels=16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn2 = nn.GroupNorm(num_groups=2, num_channels=16, eps=1e-6)

    def forward(self, x):
        x = F.silu(self.gn1(self.conv1(x)))
        return F.silu(self.gn2(self.conv2(x)))


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt v1 (original repo / older transformers) channels-first LayerNorm: normalizes axis 1."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvCfLn(nn.Module):
    """Conv -> channels-first LayerNorm (axis 1) -> GELU -> Conv -> channels-first LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 4, stride=4)
        self.ln1 = ChannelsFirstLayerNorm(16)
        self.conv2 = nn.Conv2d(16, 32, 2, stride=2)
        self.ln2 = ChannelsFirstLayerNorm(32)

    def forward(self, x):
        x = F.gelu(self.ln1(self.conv1(x)))
        return self.ln2(self.conv2(x))


class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                                batch_first=True)
        self.layer_pre = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                                    batch_first=True, norm_first=True)
        self.final = nn.LayerNorm(32, eps=1e-5)

    def forward(self, x):
        return self.final(self.layer_pre(self.layer(x)))


class SmallConvBn(nn.Module):
    """Conv(bias) -> BN -> ReLU -> Conv(no bias) -> BN: two foldable BNs (for the opset-7 export)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class LinearBN(nn.Module):
    """LeViT's Linear_BN: BatchNorm1d over the flattened tokens, reshaped back to the Linear's shape."""

    def __init__(self, a, b):
        super().__init__()
        self.c = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x):
        l = self.c(x)
        return self.bn(l.flatten(0, 1)).reshape_as(l)


class LeViTMlp(nn.Module):
    """LeViT-style residual MLP on tokens [B, N, C]: Linear_BN(32->64) -> Hardswish -> Linear_BN(64->32)."""

    def __init__(self):
        super().__init__()
        self.fc1 = LinearBN(32, 64)
        self.fc2 = LinearBN(64, 32)

    def forward(self, x):
        return x + self.fc2(F.hardswish(self.fc1(x)))


class MlpBnDropout(nn.Module):
    """Linear -> ReLU -> BatchNorm1d -> Dropout -> Linear: the BN can only fold forward into the head,
    and in eval the Dropout is an Identity between them (kept by the dynamo exporter's optimize=False)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 24)
        self.bn = nn.BatchNorm1d(24)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.drop(self.bn(F.relu(self.fc(x)))))


# ----------------------------------------------------------------------------------------------
# wrappers for transformers models: positional tensor inputs, tensor output(s)
# ----------------------------------------------------------------------------------------------
class HFWrap(nn.Module):
    def __init__(self, model, names, n_out=1, **kw):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.n_out = n_out
        self.kw = kw

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), return_dict=False, **self.kw)
        outs = tuple(o for o in out if isinstance(o, torch.Tensor))[: self.n_out]
        return outs[0] if len(outs) == 1 else outs


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def rms_like(name: str) -> bool:
    return "RMSNorm" in name or name in ("T5LayerNorm",)


def classify(m: nn.Module) -> str | None:
    name = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    if isinstance(m, getattr(nn, "RMSNorm", ())) or rms_like(name):
        return "rmsnorm"
    if isinstance(m, nn.LayerNorm) or name.endswith("LayerNorm"):
        return "layernorm"
    return None


def norm_modules(model):
    kinds = collections.Counter()
    classes = collections.Counter()
    for m in model.modules():
        k = classify(m)
        if k:
            kinds[k] += 1
            classes[type(m).__name__] += 1
    return kinds, dict(sorted(classes.items()))


@torch.no_grad()
def randomize_norms(model, seed):
    """Non-trivial running stats and affine params for every normalization module."""
    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        k = classify(m)
        if k is None:
            continue
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        if isinstance(w, torch.Tensor):
            base = 0.0 if type(m).__name__.startswith("Gemma") else 1.0   # Gemma uses (1 + weight)
            w.copy_((base + 0.25 * torch.randn(w.shape, generator=g)).to(w.dtype))
        if isinstance(b, torch.Tensor):
            b.copy_((0.2 * torch.randn(b.shape, generator=g)).to(b.dtype))
        if k == "batchnorm" and m.running_mean is not None:
            m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.3 + 1.5 * torch.rand(m.running_var.shape, generator=g))


def bn_after_linear_by_hooks(model, inputs):
    """Count BN modules whose input tensor is exactly the output of a Conv/ConvT/Linear module.

    (Does not check that the producer output has no other use: that is done by hand per model.)
    """
    produced = {}
    hits = set()
    hs = []
    lin = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
           nn.Linear)

    def out_hook(mod, inp, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = mod

    def bn_hook(mod, inp):
        if id(inp[0]) in produced:
            hits.add(id(mod))

    for m in model.modules():
        if isinstance(m, lin):
            hs.append(m.register_forward_hook(out_hook))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hs.append(m.register_forward_pre_hook(bn_hook))
    with torch.no_grad():
        model(*inputs)
    for h in hs:
        h.remove()
    return len(hits)


def strip_stack_traces(path):
    """Drop the dynamo exporter's per-node source stack traces (absolute paths, line numbers)."""
    m = onnx.load(str(path))
    for n in walk_nodes(m.graph):
        keep = [p for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    onnx.save(m, str(path))


def walk_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from walk_nodes(sg)


def op_histogram(model):
    c = collections.Counter()
    for n in walk_nodes(model.graph):
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
        c[key] += 1
    for f in model.functions:
        for n in f.node:
            c[f"(function {f.name}) {n.op_type}"] += 1
    return dict(sorted(c.items()))


NP_DT = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def make_inputs(spec, seed, shape_override=None):
    rng = np.random.default_rng(seed)
    arrs = {}
    for name, s in spec.items():
        shape = (shape_override or {}).get(name, s["shape"])
        if "low" in s:
            arrs[name] = rng.integers(s["low"], s["high"], size=shape).astype(NP_DT[s["dtype"]])
        else:
            arrs[name] = rng.standard_normal(shape).astype(NP_DT[s["dtype"]])
    return arrs


def to_torch(arrs):
    return tuple(torch.from_numpy(a.copy()) for a in arrs.values())


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res.extend(flat(o))
    return res


def ort_session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def max_diff(ort_outs, ref_outs):
    d = 0.0
    for a, b in zip(ort_outs, ref_outs):
        b = b.detach().float().numpy()
        a = np.asarray(a, dtype=np.float32)
        if a.shape != b.shape:
            raise RuntimeError(f"shape mismatch ORT {a.shape} vs torch {b.shape}")
        d = max(d, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return d


# ----------------------------------------------------------------------------------------------
# export + check + record
# ----------------------------------------------------------------------------------------------
ENTRIES: dict[str, dict] = {}
FAILED: dict[str, str] = {}


def export_and_check(*, file, model, source, exporter, opset, spec, dtype="float32", dynamic=None,
                     preserve_bn=False, notes="", seed=0, alt_shapes=None, ref_model=None, tol=1e-3,
                     bn_after_linear=None, bn_before_linear=0, bn_note="", optimize=True,
                     keep_initializers_as_inputs=None, ir_version=None):
    """Export `model` (already eval()) to models/torch/<file>, check it and record a manifest entry.

    ref_model: if given, compare ORT output against this (fp32) model instead of `model`.
    """
    path = OUT / file
    names = list(spec)
    ins_np = make_inputs(spec, seed)
    ins = to_torch(ins_np)
    t0 = time.time()
    log = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if exporter == TS:
            torch.onnx.export(
                model, ins, str(path), input_names=names, output_names=None,
                dynamic_axes=dynamic, opset_version=opset, dynamo=False,
                training=PRESERVE if preserve_bn else EVAL, do_constant_folding=True,
                keep_initializers_as_inputs=keep_initializers_as_inputs)
            if ir_version is not None:
                mm = onnx.load(str(path))
                mm.ir_version = ir_version
                onnx.save(mm, str(path))
        else:
            dyn_shapes = None
            if dynamic:
                Dim = torch.export.Dim
                dims = {}
                dyn_shapes = []
                for n in names:
                    ax = dynamic.get(n, {})
                    dyn_shapes.append({i: dims.setdefault(lbl, Dim(lbl)) for i, lbl in ax.items()} or None)
                dyn_shapes = tuple(dyn_shapes)
                import inspect
                params = inspect.signature(model.forward).parameters.values()
                if any(p.kind == p.VAR_POSITIONAL for p in params):
                    dyn_shapes = (dyn_shapes,)   # forward(*args): one structured argument
            prog = torch.onnx.export(
                model, ins, None, input_names=names, opset_version=opset, dynamo=True,
                external_data=False, dynamic_shapes=dyn_shapes, optimize=optimize)
            prog.save(str(path), external_data=False)
            strip_stack_traces(path)
    export_s = time.time() - t0

    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    sess = ort_session(path)
    sess_in = [i.name for i in sess.get_inputs()]
    ref = ref_model if ref_model is not None else model

    def compare(arrs):
        feed = {k: v for k, v in arrs.items() if k in sess_in}
        outs = sess.run(None, feed)
        t_in = to_torch(arrs)
        if ref_model is not None:
            t_in = tuple(t.float() if t.is_floating_point() else t for t in t_in)
        with torch.no_grad():
            r = flat(ref(*t_in))
        return max_diff(outs, r)

    diff = compare(ins_np)
    alt = []
    for k, ov in enumerate(alt_shapes or []):
        alt.append({"shapes": ov, "max_abs_diff": float(f"{compare(make_inputs(spec, seed + 7 + k, ov)):.3g}")})
    if not math.isfinite(diff) or diff > tol:
        raise RuntimeError(f"ORT vs torch max abs diff {diff} > tol {tol}")

    kinds, classes = norm_modules(model)
    gt = {k: kinds.get(k, 0) for k in ("batchnorm", "layernorm", "rmsnorm", "groupnorm")}
    if bn_after_linear is None:
        bn_after_linear = 0 if gt["batchnorm"] == 0 else bn_after_linear_by_hooks(model, ins)
    gt = {"batchnorm": gt["batchnorm"], "batchnorm_after_linear": bn_after_linear,
          "batchnorm_before_linear": bn_before_linear, "layernorm": gt["layernorm"],
          "rmsnorm": gt["rmsnorm"], "groupnorm": gt["groupnorm"]}
    entry = {
        "file": file,
        "source": source,
        "exporter": exporter,
        "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
        "dtype": dtype,
        "inputs": spec,
        "outputs": [o.name for o in m.graph.output],
        "ground_truth": gt,
        "norm_module_classes": classes,
        "observed_ops": op_histogram(m),
        "ort_vs_torch_max_abs_diff": float(f"{diff:.3g}"),
        "size_bytes": path.stat().st_size,
        "notes": " ".join(x for x in (notes, bn_note) if x),
    }
    if dynamic:
        entry["dynamic_axes"] = {k: {str(i): v for i, v in ax.items()} for k, ax in dynamic.items()}
    if alt:
        entry["other_shape_checks"] = alt
    if ref_model is not None:
        entry["compared_against"] = "float32 PyTorch model (ORT fp16 output vs fp32 reference)"
    ENTRIES[file] = entry
    print(f"  ok {file}: {entry['size_bytes']/1024:.0f} KB, opset {entry['opset']}, diff {diff:.2e}, "
          f"export {export_s:.1f}s, gt {gt}", flush=True)


# ----------------------------------------------------------------------------------------------
# model builders
# ----------------------------------------------------------------------------------------------
def seeded(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def ready(model, seed):
    randomize_norms(model, seed)
    return model.eval()


def img_spec(n=1, c=3, h=32, w=32, name="pixel_values"):
    return {name: {"shape": [n, c, h, w], "dtype": "float32"}}


def text_spec(vocab, b=2, s=8, mask=True, mask_name="attention_mask"):
    spec = {"input_ids": {"shape": [b, s], "dtype": "int64", "low": 0, "high": vocab}}
    if mask:
        spec[mask_name] = {"shape": [b, s], "dtype": "int64", "low": 1, "high": 2}
    return spec


def text_dyn(spec):
    return {k: {0: "batch", 1: "sequence"} for k in spec}


TEXT_ALT = [{"input_ids": [3, 5], "attention_mask": [3, 5]}]


def tiny_bert(dtype=torch.float32, **kw):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64, type_vocab_size=2,
                     attn_implementation="eager", **kw)
    return BertModel(cfg), cfg


BERT_SRC = ("transformers.BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, "
            "intermediate_size=64, vocab_size=128, max_position_embeddings=64, attn_implementation='eager'))")


def tiny_llama():
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64,
                      attn_implementation="eager")
    return LlamaModel(cfg)


LLAMA_SRC = ("transformers.LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, "
             "num_key_value_heads=4, intermediate_size=64, vocab_size=128, max_position_embeddings=64, "
             "attn_implementation='eager'))")


def build_cnn_bn():
    seeded(1)
    m = ready(CnnBn(), 1)
    export_and_check(file="cnn_bn_op13.onnx", model=m, source="hand-written nn.Module CnnBn in export_torch.py",
                     exporter=TS, opset=13, spec=img_spec(2, 3, 32, 32, "x"), preserve_bn=True, seed=1,
                     dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [3, 3, 32, 32]}], bn_after_linear=6,
                     bn_before_linear=1,
                     notes="BN after: Conv(no bias), Conv(bias), depthwise Conv(group=16), grouped Conv(group=2, "
                           "bias), ConvTranspose(group=2, bias), Gemm (Linear+BatchNorm1d on [N,24]) = 6 foldable. "
                           "Not foldable into a producer: BN whose Conv output also feeds a residual Add (bn5), "
                           "BN2d after Relu (bn6), BatchNorm1d after Relu (bn9); bn9 is read only by the Linear "
                           "head, so it folds forward into that Gemm (bn6 feeds a padded ConvTranspose and "
                           "stays). Exported with TrainingMode.PRESERVE on an eval() "
                           "module so BatchNormalization nodes stay.")


def build_conv1d3d():
    seeded(2)
    m = ready(Conv1d3dBn(), 2)
    spec = {"seq": {"shape": [2, 4, 16], "dtype": "float32"}, "vol": {"shape": [1, 2, 8, 8, 8], "dtype": "float32"}}
    export_and_check(file="conv1d3d_bn_op13.onnx", model=m, source="hand-written nn.Module Conv1d3dBn in export_torch.py",
                     exporter=TS, opset=13, spec=spec, preserve_bn=True, seed=2, bn_after_linear=3,
                     notes="Conv1d(bias)->BatchNorm1d, depthwise Conv1d(group=8, no bias)->BatchNorm1d, "
                           "Conv3d(no bias)->BatchNorm3d; all 3 foldable.")


def build_cnn_bn_dynamo():
    seeded(1)
    m = ready(CnnBn(), 1)
    export_and_check(file="cnn_bn_dynamo_op18.onnx", model=m, source="hand-written nn.Module CnnBn in export_torch.py",
                     exporter=DY, opset=18, spec=img_spec(2, 3, 32, 32, "x"), seed=1, bn_after_linear=6,
                     bn_before_linear=1,
                     dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [3, 3, 32, 32]}],
                     notes="Same module/weights as cnn_bn_op13.onnx, exported with dynamo=True (optimize=True, the "
                           "default) from an eval() module. The exporter's optimizer FOLDED the 6 foldable BNs itself "
                           "(Conv/ConvTranspose/Gemm weights rescaled); only 3 BatchNormalization nodes remain: "
                           "bn5 (Conv output shared with the residual Add), bn6 and bn9 (after Relu). ground_truth "
                           "counts modules, so it still says 9/6.")


def build_cnn_bn_dynamo_noopt():
    seeded(1)
    m = ready(CnnBn(), 1)
    export_and_check(file="cnn_bn_dynamo_noopt_op18.onnx", model=m,
                     source="hand-written nn.Module CnnBn in export_torch.py", exporter=DY, opset=18,
                     spec=img_spec(2, 3, 32, 32, "x"), seed=1, bn_after_linear=6, bn_before_linear=1,
                     optimize=False,
                     dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [3, 3, 32, 32]}],
                     notes="Same module/weights as cnn_bn_op13.onnx, dynamo=True with optimize=False: all 9 "
                           "BatchNormalization nodes stay (from aten._native_batch_norm_legit_no_training), graph "
                           "is otherwise unoptimized. Trap: conv1 and dw (bias=False) get a computed zero bias "
                           "input Expand(CastLike(Constant 0.0, x), Expand(Shape(W)[0:1], [1])), not an initializer.")


def build_hf_cnn(kind, opset=13, size=32):
    from transformers import (EfficientNetConfig, EfficientNetModel, MobileNetV2Config, MobileNetV2Model,
                              RegNetConfig, RegNetModel, ResNetConfig, ResNetModel)
    seeded(10)
    if kind == "resnet":
        cfg_s = "ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type='basic')"
        model = ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"))
        src = f"transformers.ResNetModel({cfg_s})"
        note = ("ResNetConvLayer = Conv(no bias)->BN->act, ResNetShortCut = 1x1 Conv->BN; every BN consumes a "
                "sole-use Conv output. Stage 2 has a projection shortcut, so the block input feeds both the main "
                "Conv and the shortcut Conv (a shared Conv *input*, not a shared output).")
    elif kind == "resnet_bottleneck":
        cfg_s = ("ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type='bottleneck', "
                 "downsample_in_bottleneck=True)")
        model = ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                         layer_type="bottleneck", downsample_in_bottleneck=True))
        src = f"transformers.ResNetModel({cfg_s})"
        note = "Bottleneck ResNet: Conv->BN everywhere incl. projection shortcuts; every BN is foldable."
    elif kind == "mobilenetv2":
        cfg_s = "MobileNetV2Config(depth_multiplier=0.25, image_size=32, finegrained_output=False)"
        model = MobileNetV2Model(MobileNetV2Config(depth_multiplier=0.25, image_size=size, finegrained_output=False))
        src = f"transformers.MobileNetV2Model({cfg_s})"
        note = ("MobileNetV2ConvLayer = Conv(no bias)->BN(eps=1e-3)->ReLU6; inverted residuals with depthwise "
                "Conv (group=C) -> BN; all BN foldable. ReLU6 exported as Clip.")
    elif kind == "efficientnet":
        cfg_s = ("EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, "
                 "hidden_dim=320, num_channels=3)")
        model = EfficientNetModel(EfficientNetConfig(image_size=size, width_coefficient=0.25, depth_coefficient=0.25,
                                                     hidden_dim=320, num_channels=3))
        src = f"transformers.EfficientNetModel({cfg_s})"
        note = ("EfficientNet: stem Conv->BN, expansion 1x1 Conv->BN, depthwise Conv(group=C)->BN, "
                "squeeze-excite (no BN), projection 1x1 Conv->BN, top Conv->BN; all BN foldable "
                "(BN momentum/eps from config, eps=1e-3).")
    elif kind == "regnet":
        cfg_s = "RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)"
        model = RegNetModel(RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8))
        src = f"transformers.RegNetModel({cfg_s})"
        note = ("RegNet Y-block: 1x1 Conv->BN, grouped 3x3 Conv (groups = C/8)->BN, SE, 1x1 Conv->BN, shortcut "
                "1x1 Conv->BN; all BN foldable.")
    else:
        raise ValueError(kind)
    model = ready(model, 10)
    w = HFWrap(model, ["pixel_values"], n_out=2).eval()
    export_and_check(file=f"hf_{kind}_op{opset}.onnx", model=w, source=src, exporter=TS, opset=opset,
                     spec=img_spec(1, 3, size, size), preserve_bn=True, seed=10,
                     dynamic={"pixel_values": {0: "batch"}}, alt_shapes=[{"pixel_values": [2, 3, size, size]}],
                     notes=note + " batchnorm_after_linear counted by forward hooks (BN input tensor is a "
                                  "Conv module output) and by reading the modeling code (no second consumer). "
                                  "Outputs: last_hidden_state, pooler_output.")


def build_transformer_block():
    seeded(20)
    m = ready(TransformerBlock(), 20)
    spec = {"x": {"shape": [2, 8, 32], "dtype": "float32"}}
    # eval()+no_grad would route TransformerEncoderLayer to the fused aten::_transformer_encoder_layer_fwd
    # "fast path", which has no ONNX symbolic: use the module's regular Python code path.
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_transformer_block(m, spec)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def _export_transformer_block(m, spec):
    export_and_check(file="transformer_block_op14.onnx", model=m,
                     source="hand-written TransformerBlock: 2 x torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, "
                            "dim_feedforward=64, batch_first=True) (post-norm, then norm_first=True) + final nn.LayerNorm",
                     exporter=TS, opset=14, spec=spec, seed=20,
                     notes="5 nn.LayerNorm: post-norm layer (norm1, norm2 after residual Add), pre-norm layer "
                           "(norm1, norm2 before attention / FFN), final LayerNorm. Static shapes only: the traced "
                           "nn.MultiheadAttention bakes batch*heads into a Reshape, so dynamic axes give a graph that "
                           "fails at other shapes. Exported with torch.backends.mha fast path disabled.")


def build_bert(opset, exporter=TS):
    seeded(30)
    model, _ = tiny_bert()
    model = ready(model, 30)
    spec = text_spec(128)
    spec["token_type_ids"] = {"shape": [2, 8], "dtype": "int64", "low": 0, "high": 2}
    w = HFWrap(model, list(spec), n_out=2).eval()
    tag = "dynamo_" if exporter == DY else ""
    export_and_check(file=f"hf_bert_{tag}op{opset}.onnx", model=w, source=BERT_SRC, exporter=exporter, opset=opset,
                     spec=spec, seed=30, dynamic=text_dyn(spec),
                     alt_shapes=[{"input_ids": [3, 5], "attention_mask": [3, 5], "token_type_ids": [3, 5]}],
                     notes="5 nn.LayerNorm (eps=1e-12): embeddings LN + 2 per layer. Outputs last_hidden_state, "
                           "pooler_output.")


def build_gpt2(opset=14):
    from transformers import GPT2Config, GPT2Model
    seeded(31)
    model = ready(GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                       attn_implementation="eager")), 31)
    spec = text_spec(128)
    w = HFWrap(model, list(spec), use_cache=False).eval()
    export_and_check(file=f"hf_gpt2_op{opset}.onnx", model=w,
                     source="transformers.GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, "
                            "n_positions=64, attn_implementation='eager'))",
                     exporter=TS, opset=opset, spec=spec, seed=31, dynamic=text_dyn(spec), alt_shapes=TEXT_ALT,
                     notes="5 nn.LayerNorm (eps=1e-5): ln_1, ln_2 per block (pre-norm) + ln_f. GPT-2 linears are "
                           "Conv1D modules (addmm) -> exported as MatMul+Add / Gemm.")


def build_vit(opset=14):
    from transformers import ViTConfig, ViTModel
    seeded(32)
    model = ready(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=32, patch_size=8, attn_implementation="eager"),
                           add_pooling_layer=False), 32)
    w = HFWrap(model, ["pixel_values"]).eval()
    export_and_check(file=f"hf_vit_op{opset}.onnx", model=w,
                     source="transformers.ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, "
                            "intermediate_size=64, image_size=32, patch_size=8, attn_implementation='eager'), "
                            "add_pooling_layer=False)",
                     exporter=TS, opset=opset, spec=img_spec(1, 3, 32, 32), seed=32,
                     dynamic={"pixel_values": {0: "batch"}}, alt_shapes=[{"pixel_values": [2, 3, 32, 32]}],
                     notes="5 nn.LayerNorm (eps=1e-12): layernorm_before/after per layer + final layernorm.")


def build_convnext(opset=14):
    from transformers import ConvNextConfig, ConvNextModel
    seeded(33)
    model = ready(ConvNextModel(ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                               patch_size=4, image_size=32, layer_scale_init_value=0.5)), 33)
    w = HFWrap(model, ["pixel_values"], n_out=2).eval()
    export_and_check(file=f"hf_convnext_op{opset}.onnx", model=w,
                     source="transformers.ConvNextModel(ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], "
                            "depths=[1, 1], patch_size=4, image_size=32, layer_scale_init_value=0.5))",
                     exporter=TS, opset=opset, spec=img_spec(1, 3, 32, 32), seed=33,
                     dynamic={"pixel_values": {0: "batch"}}, alt_shapes=[{"pixel_values": [2, 3, 32, 32]}],
                     notes="ConvNextLayerNorm (subclass of nn.LayerNorm): channels_first ones (embeddings, "
                           "downsampling) are written as permute(0,2,3,1) -> layer_norm over last axis -> "
                           "permute(0,3,1,2) in transformers 5, i.e. Transpose around a last-axis LN; block LNs are "
                           "channels_last after a permute; final pooler nn.LayerNorm on [N, C].")


def build_cf_ln(opset=14):
    seeded(34)
    m = ready(ConvCfLn(), 34)
    export_and_check(file=f"cf_layernorm_op{opset}.onnx", model=m,
                     source="hand-written nn.Module ConvCfLn with ChannelsFirstLayerNorm (ConvNeXt v1 original code: "
                            "mean over dim 1) in export_torch.py",
                     exporter=TS, opset=opset, spec=img_spec(1, 3, 32, 32, "x"), seed=34,
                     dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [2, 3, 32, 32]}],
                     notes="LayerNorm over axis 1 of NCHW (ReduceMean axes=[1]); gamma/beta are [C,1,1] "
                           "(weight[:, None, None]). Module class name ChannelsFirstLayerNorm counted as layernorm.")


def build_llama(opset, exporter=TS):
    seeded(40)
    model = ready(tiny_llama(), 40)
    spec = text_spec(128)
    w = HFWrap(model, list(spec), use_cache=False).eval()
    tag = "dynamo_" if exporter == DY else ""
    # dynamo at opset 23 fuses rotary embeddings into RotaryEmbedding, which onnxruntime rejects with
    # symbolic shapes (cos/sin cache shape check): export that one with static shapes.
    static = exporter == DY and opset >= 23
    export_and_check(file=f"hf_llama_{tag}op{opset}.onnx", model=w, source=LLAMA_SRC, exporter=exporter,
                     opset=opset, spec=spec, seed=40, dynamic=None if static else text_dyn(spec),
                     alt_shapes=None if static else TEXT_ALT,
                     notes="5 LlamaRMSNorm (eps=1e-6): input_layernorm, post_attention_layernorm per layer + final "
                           "norm. forward: x.to(float32); x * rsqrt(x.pow(2).mean(-1) + eps); weight * x.to(dtype)."
                           + (" Dynamo at opset 23 writes the standard RMSNormalization op itself (already fused: "
                              "nothing to do for normfold); it also fuses rotary embeddings into RotaryEmbedding, which ORT only "
                              "runs with static shapes, so this file has static shapes [2,8]." if static else ""))


def build_t5(opset=14):
    from transformers import T5Config, T5EncoderModel
    seeded(41)
    model = ready(T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128,
                                          relative_attention_num_buckets=8, dropout_rate=0.0)), 41)
    spec = text_spec(128)
    w = HFWrap(model, list(spec)).eval()
    export_and_check(file=f"hf_t5enc_op{opset}.onnx", model=w,
                     source="transformers.T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, "
                            "num_heads=4, vocab_size=128, relative_attention_num_buckets=8))",
                     exporter=TS, opset=opset, spec=spec, seed=41, dynamic=text_dyn(spec), alt_shapes=TEXT_ALT,
                     notes="5 T5LayerNorm = RMSNorm (no mean subtraction, no bias, eps=1e-6): 2 per layer + "
                           "final_layer_norm. variance computed on x.to(float32); weight * (x * rsqrt(var + eps)).")


def build_t5_fp16(opset=14):
    """T5 encoder in float16: T5LayerNorm casts X to float32 twice (once for the variance, once when
    the fp16 X meets the float32 rsqrt), then back to fp16 before the weight."""
    from transformers import T5Config, T5EncoderModel
    import copy
    seeded(42)
    model32 = ready(T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                            vocab_size=128, relative_attention_num_buckets=8,
                                            dropout_rate=0.0)), 42)
    model16 = copy.deepcopy(model32).half().eval()
    spec = text_spec(128)
    w16 = HFWrap(model16, list(spec)).eval()
    w32 = HFWrap(model32, list(spec)).eval()
    ref, note = None, ""
    try:
        with torch.no_grad():
            ins = to_torch(make_inputs(spec, 42))
            dd = max(float((a.float() - b).abs().max()) for a, b in zip(flat(w16(*ins)), flat(w32(*ins))))
        note = f"ORT compared with the torch fp16 model; torch fp16 vs fp32 max abs diff {dd:.3g}."
    except Exception as e:  # pragma: no cover - depends on CPU kernels
        ref = w32
        note = f"torch fp16 forward failed on CPU ({type(e).__name__}); ORT fp16 compared with the fp32 model."
    export_and_check(file=f"hf_t5enc_fp16_op{opset}.onnx", model=w16,
                     source="transformers.T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, "
                            "num_heads=4, vocab_size=128, relative_attention_num_buckets=8)).half()",
                     exporter=TS, opset=opset, spec=spec, dtype="float16", seed=42, dynamic=text_dyn(spec),
                     alt_shapes=TEXT_ALT, ref_model=ref, tol=5e-2,
                     notes=note + " 5 T5LayerNorm (RMSNorm) in fp16: Cast(X, to=FLOAT) -> Pow -> ReduceMean -> Add(eps)"
                           " -> Sqrt -> Div(1, .) and a second Cast(X, to=FLOAT) -> Mul(., that) -> Cast(to=FLOAT16)"
                           " -> Mul(weight fp16).")


def build_conv_bn_opset7():
    """TorchScript at opset 7 with initializers kept as graph inputs, IR version 3 (what IR < 4 requires and
    what old exporters and model zoos wrote)."""
    seeded(70)
    m = ready(SmallConvBn(), 70)
    file = "conv_bn_op7.onnx"
    export_and_check(file=file, model=m, source="hand-written nn.Module SmallConvBn in export_torch.py",
                     exporter=TS, opset=7, spec=img_spec(1, 3, 16, 16, "x"), preserve_bn=True, seed=70,
                     bn_after_linear=2, keep_initializers_as_inputs=True, ir_version=3,
                     notes="Conv(bias)->BN->Relu->Conv(no bias)->BN, TrainingMode.PRESERVE, opset 7, "
                           "keep_initializers_as_inputs=True; ir_version set to 3 after export (torch writes a "
                           "newer IR): every weight and BN parameter is also a graph input, as IR < 4 requires.")


def build_levit_bn_dynamo():
    seeded(71)
    m = ready(LeViTMlp(), 71)
    export_and_check(file="levit_linear_bn_dynamo_noopt_op18.onnx", model=m,
                     source="hand-written nn.Module LeViTMlp (LeViT's Linear_BN) in export_torch.py", exporter=DY,
                     opset=18, spec={"x": {"shape": [2, 16, 32], "dtype": "float32"}}, seed=71, bn_after_linear=2,
                     optimize=False, dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [3, 16, 32]}],
                     notes="Same module/weights as levit_linear_bn_op13.onnx through the dynamo exporter without its "
                           "optimizer (optimize=True folds the BNs itself) and with a dynamic batch: the flatten and "
                           "reshape_as targets are computed.")


def build_levit_bn():
    seeded(71)
    m = ready(LeViTMlp(), 71)
    export_and_check(file="levit_linear_bn_op13.onnx", model=m,
                     source="hand-written nn.Module LeViTMlp (LeViT's Linear_BN) in export_torch.py", exporter=TS,
                     opset=13, spec={"x": {"shape": [2, 16, 32], "dtype": "float32"}}, preserve_bn=True, seed=71,
                     bn_after_linear=2,
                     notes="LeViT Linear_BN twice: MatMul(no bias) -> Flatten(axis=2... the flatten(0, 1)) -> "
                           "BatchNormalization -> Reshape(., Shape(MatMul output)); the MatMul output has two "
                           "readers (Flatten, Shape). Both BNs fold into their MatMul (bn_after_linear=2 by hand: "
                           "the hooks do not see through the flatten).")


def build_mlp_bn_dropout():
    seeded(72)
    m = ready(MlpBnDropout(), 72)
    export_and_check(file="mlp_bn_dropout_dynamo_noopt_op18.onnx", model=m,
                     source="hand-written nn.Module MlpBnDropout in export_torch.py", exporter=DY, opset=18,
                     spec={"x": {"shape": [2, 16], "dtype": "float32"}}, seed=72, bn_after_linear=0,
                     bn_before_linear=1, optimize=False,
                     notes="dynamo=True, optimize=False: Gemm -> Relu -> BatchNormalization -> Identity (eval "
                           "Dropout) -> Gemm. The BN (after Relu) folds forward into the head Gemm only by "
                           "looking through the Identity (bn_before_linear=1).")


def build_qwen2(opset=14):
    from transformers import Qwen2Config, Qwen2Model
    seeded(42)
    model = ready(Qwen2Model(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                         max_position_embeddings=64, attn_implementation="eager")), 42)
    spec = text_spec(128)
    w = HFWrap(model, list(spec), use_cache=False).eval()
    export_and_check(file=f"hf_qwen2_op{opset}.onnx", model=w,
                     source="transformers.Qwen2Model(Qwen2Config(hidden_size=32, num_hidden_layers=2, "
                            "num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=128, "
                            "max_position_embeddings=64, attn_implementation='eager'))",
                     exporter=TS, opset=opset, spec=spec, seed=42, dynamic=text_dyn(spec), alt_shapes=TEXT_ALT,
                     notes="5 Qwen2RMSNorm (Llama-style, eps=1e-6); q/k/v projections have bias (MatMul+Add), GQA.")


def build_gemma(opset=14):
    from transformers import GemmaConfig, GemmaModel
    seeded(43)
    model = ready(GemmaModel(GemmaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=1, head_dim=8, intermediate_size=64, vocab_size=128,
                                         max_position_embeddings=64, attn_implementation="eager")), 43)
    spec = text_spec(128)
    w = HFWrap(model, list(spec), use_cache=False).eval()
    export_and_check(file=f"hf_gemma_op{opset}.onnx", model=w,
                     source="transformers.GemmaModel(GemmaConfig(hidden_size=32, num_hidden_layers=2, "
                            "num_attention_heads=4, num_key_value_heads=1, head_dim=8, intermediate_size=64, "
                            "vocab_size=128, max_position_embeddings=64, attn_implementation='eager'))",
                     exporter=TS, opset=opset, spec=spec, seed=43, dynamic=text_dyn(spec), alt_shapes=TEXT_ALT,
                     notes="5 GemmaRMSNorm: x.float() * rsqrt(mean(x^2) + eps) * (1.0 + weight.float()), "
                           "type_as(x). weight randomized around 0 (effective scale 1 + w).")


class LinearRmsBlock(nn.Module):
    """Linear -> torch.nn.RMSNorm (affine) -> SiLU -> Linear -> torch.nn.RMSNorm(elementwise_affine=False)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.norm1 = nn.RMSNorm(32, eps=1e-6)
        self.fc2 = nn.Linear(32, 32)
        self.norm2 = nn.RMSNorm(32, eps=1e-5, elementwise_affine=False)

    def forward(self, x):
        return self.norm2(self.fc2(F.silu(self.norm1(self.fc1(x)))))


def build_rms_module(opset):
    seeded(44)
    m = ready(LinearRmsBlock(), 44)
    export_and_check(file=f"linear_rmsnorm_dynamo_op{opset}.onnx", model=m,
                     source="hand-written nn.Module LinearRmsBlock (torch.nn.RMSNorm) in export_torch.py",
                     exporter=DY, opset=opset, spec={"x": {"shape": [2, 8, 32], "dtype": "float32"}}, seed=44,
                     dynamic={"x": {0: "batch", 1: "sequence"}}, alt_shapes=[{"x": [3, 5, 32]}],
                     notes="torch.nn.RMSNorm (aten::rms_norm has no TorchScript-exporter symbolic, so dynamo only): "
                           "norm1 affine eps=1e-6, norm2 elementwise_affine=False eps=1e-5 (no gamma Mul).")


def build_groupnorm(opset, exporter=TS):
    seeded(50)
    m = ready(ConvGroupNorm(), 50)
    tag = "dynamo_" if exporter == DY else ""
    export_and_check(file=f"conv_groupnorm_{tag}op{opset}.onnx", model=m,
                     source="hand-written nn.Module ConvGroupNorm in export_torch.py", exporter=exporter, opset=opset,
                     spec=img_spec(2, 3, 16, 16, "x"), seed=50,
                     dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [1, 3, 16, 16]}],
                     notes="Conv(bias) -> GroupNorm(4 groups, 16 ch, eps=1e-5) -> SiLU -> Conv -> "
                           "GroupNorm(2 groups, 16 ch, eps=1e-6) -> SiLU; gamma/beta per channel, randomized.")


def build_wav2vec2(opset=14):
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    seeded(51)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), feat_extract_norm="group",
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=False,
                         mask_time_prob=0.0, attn_implementation="eager")
    model = ready(Wav2Vec2Model(cfg), 51)
    spec = {"input_values": {"shape": [1, 400], "dtype": "float32"}}
    w = HFWrap(model, list(spec)).eval()
    export_and_check(file=f"hf_wav2vec2_op{opset}.onnx", model=w,
                     source="transformers.Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, "
                            "num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), "
                            "conv_kernel=(10, 3), feat_extract_norm='group', num_conv_pos_embeddings=16, "
                            "num_conv_pos_embedding_groups=4, mask_time_prob=0.0, attn_implementation='eager'))",
                     exporter=TS, opset=opset, spec=spec, seed=51,
                     dynamic={"input_values": {0: "batch", 1: "samples"}},
                     alt_shapes=[{"input_values": [2, 320]}],
                     notes="Feature extractor layer 0: Conv1d(no bias) -> GroupNorm(num_groups=16, num_channels=16) "
                           "(groups == channels, i.e. per-channel instance norm over time) -> GELU. Then "
                           "feature_projection nn.LayerNorm, encoder LayerNorm, 2 per layer (post-norm). "
                           "pos_conv_embed uses weight_norm (folded to constants at export).")


def build_cnn_bn_fp16():
    seeded(1)
    m32 = ready(CnnBn(), 1)
    import copy
    m16 = copy.deepcopy(m32).half().eval()
    spec = img_spec(2, 3, 32, 32, "x")
    spec["x"]["dtype"] = "float16"
    export_and_check(file="cnn_bn_fp16_op13.onnx", model=m16, source="hand-written nn.Module CnnBn in "
                     "export_torch.py, .half()", exporter=TS, opset=13, spec=spec, dtype="float16",
                     preserve_bn=True, seed=1, dynamic={"x": {0: "batch"}}, alt_shapes=[{"x": [3, 3, 32, 32]}],
                     bn_after_linear=6, bn_before_linear=1, tol=5e-2,
                     notes="Same module/weights as cnn_bn_op13.onnx in float16 (input, weights, BN params and "
                           "running stats all float16), TrainingMode.PRESERVE; ORT compared with the torch fp16 "
                           "module. Folding must compute the new weights in float32 and store them as float16.")


def build_fp16(kind):
    seeded(60)
    if kind == "bert":
        model32, _ = tiny_bert()
        model32 = ready(model32, 60)
        spec = text_spec(128)
        src, kw, n_out = BERT_SRC + ".half()", {}, 2
    else:
        model32 = ready(tiny_llama(), 60)
        spec = text_spec(128)
        src, kw, n_out = LLAMA_SRC + ".half()", {"use_cache": False}, 1
    import copy
    model16 = copy.deepcopy(model32).half().eval()
    w16 = HFWrap(model16, list(spec), n_out=n_out, **kw).eval()
    w32 = HFWrap(model32, list(spec), n_out=n_out, **kw).eval()
    note = ""
    ref = None
    ins = to_torch(make_inputs(spec, 60))
    try:
        with torch.no_grad():
            o16 = flat(w16(*ins))
            o32 = flat(w32(*ins))
        dd = max(float((a.float() - b).abs().max()) for a, b in zip(o16, o32))
        note = (f"torch fp16 forward runs on CPU; ORT compared with the torch fp16 model; torch fp16 vs fp32 "
                f"max abs diff {dd:.3g}.")
    except Exception as e:  # pragma: no cover - depends on CPU kernels
        ref = w32
        note = f"torch fp16 forward failed on CPU ({type(e).__name__}); ORT fp16 compared with fp32 model."
    export_and_check(file=f"hf_{kind}_fp16_op14.onnx", model=w16, source=src, exporter=TS, opset=14, spec=spec,
                     dtype="float16", seed=60, dynamic=text_dyn(spec), alt_shapes=TEXT_ALT if kind != "bert" else
                     [{"input_ids": [3, 5], "attention_mask": [3, 5]}], ref_model=ref, tol=5e-2,
                     notes=note + " Weights/activations float16; inputs are int64 ids.")


BUILDERS = [
    ("cnn_bn_op13", build_cnn_bn),
    ("conv1d3d_bn_op13", build_conv1d3d),
    ("hf_resnet_op13", lambda: build_hf_cnn("resnet", 13)),
    ("hf_resnet_op16", lambda: build_hf_cnn("resnet", 16)),
    ("hf_resnet_bottleneck_op13", lambda: build_hf_cnn("resnet_bottleneck", 13)),
    ("hf_mobilenetv2_op13", lambda: build_hf_cnn("mobilenetv2", 13)),
    ("hf_efficientnet_op13", lambda: build_hf_cnn("efficientnet", 13)),
    ("hf_regnet_op13", lambda: build_hf_cnn("regnet", 13)),
    ("transformer_block_op14", build_transformer_block),
    ("hf_bert_op11", lambda: build_bert(11)),
    ("hf_bert_op14", lambda: build_bert(14)),
    ("hf_bert_op16", lambda: build_bert(16)),
    ("hf_bert_op17", lambda: build_bert(17)),
    ("hf_gpt2_op14", lambda: build_gpt2(14)),
    ("hf_vit_op14", lambda: build_vit(14)),
    ("hf_convnext_op14", lambda: build_convnext(14)),
    ("cf_layernorm_op14", lambda: build_cf_ln(14)),
    ("hf_llama_op14", lambda: build_llama(14)),
    ("hf_llama_op17", lambda: build_llama(17)),
    ("hf_llama_op18", lambda: build_llama(18)),
    ("hf_t5enc_op14", lambda: build_t5(14)),
    ("hf_qwen2_op14", lambda: build_qwen2(14)),
    ("hf_gemma_op14", lambda: build_gemma(14)),
    ("conv_groupnorm_op13", lambda: build_groupnorm(13)),
    ("conv_groupnorm_op18", lambda: build_groupnorm(18)),
    ("hf_wav2vec2_op14", lambda: build_wav2vec2(14)),
    ("cnn_bn_fp16_op13", build_cnn_bn_fp16),
    ("hf_bert_fp16_op14", lambda: build_fp16("bert")),
    ("hf_llama_fp16_op14", lambda: build_fp16("llama")),
    ("hf_bert_dynamo_op18", lambda: build_bert(18, DY)),
    ("hf_llama_dynamo_op18", lambda: build_llama(18, DY)),
    ("hf_llama_dynamo_op23", lambda: build_llama(23, DY)),
    ("cnn_bn_dynamo_op18", build_cnn_bn_dynamo),
    ("cnn_bn_dynamo_noopt_op18", build_cnn_bn_dynamo_noopt),
    ("linear_rmsnorm_dynamo_op18", lambda: build_rms_module(18)),
    ("conv_groupnorm_dynamo_op18", lambda: build_groupnorm(18, DY)),
    ("hf_t5enc_fp16_op14", build_t5_fp16),
    ("conv_bn_op7", build_conv_bn_opset7),
    ("levit_linear_bn_op13", build_levit_bn),
    ("mlp_bn_dropout_dynamo_noopt_op18", build_mlp_bn_dropout),
    ("hf_t5enc_fp16_op17", lambda: build_t5_fp16(17)),
    ("levit_linear_bn_dynamo_noopt_op18", build_levit_bn_dynamo),
]


# What the exporters wrote (torch 2.13, transformers 5.24), read off the files of this corpus.
# K = Constant node, C = initializer, X = normalized input, d = Sub(X, mean).
SPELLINGS = {
    "batchnorm/torchscript_preserve": "Conv|ConvTranspose|Gemm -> BatchNormalization(X, scale C, B C, mean C, var C; "
                                      "epsilon, momentum=0.9; 1 output). Without PRESERVE the exporter folds Conv+BN.",
    "batchnorm/dynamo_optimize": "optimize=True (default) folds Conv/ConvTranspose/Gemm+BN itself; BN stays only after "
                                 "a Relu or a Conv whose output has another consumer.",
    "batchnorm/dynamo_noopt": "optimize=False keeps every BatchNormalization; a Conv without bias gets a COMPUTED zero "
                              "bias input: Expand(CastLike(K 0.0, x), Expand(Shape(W, start=0, end=1), K[1])).",
    "batchnorm/fp16": "all-fp16 graph: Conv(fp16 W) -> BatchNormalization with fp16 scale/B/mean/var; no Casts.",
    "layernorm/torchscript_op<=16": "ReduceMean(X; axes=[-1] attribute, keepdims attr absent) -> Sub(X, mean) "
                                    "[Sub output has 2 consumers] -> Pow(d, K 2.0 f32 scalar) -> ReduceMean(axes=[-1]) "
                                    "-> Add(K eps f32 scalar) -> Sqrt -> Div(d, sqrt) -> Mul(., C gamma[D]) -> "
                                    "Add(., C beta[D]). Same at opsets 11, 14, 16.",
    "layernorm/torchscript_op17": "LayerNormalization(X, C gamma, C beta; axis=-1, epsilon).",
    "layernorm/torchscript_op14_fp16": "ReduceMean(X fp16) -> Sub (fp16) -> Cast(to=DOUBLE) -> Pow(K 2.0 f64) -> "
                                       "ReduceMean -> Add(K 1e-12 f64) -> Sqrt -> Div(Cast(d), sqrt) -> Cast(to="
                                       "FLOAT16) -> Mul(C gamma fp16) -> Add(C beta fp16).",
    "layernorm/channels_first_handwritten": "ReduceMean(axes=[1], keepdims=1) -> Sub -> Pow(2) -> ReduceMean(axes=[1]) "
                                            "-> Add(eps) -> Sqrt -> Div -> Mul(C gamma[C,1,1], .) (gamma FIRST) -> "
                                            "Add(., C beta[C,1,1]).",
    "layernorm/convnext_transformers5": "channels_first = Transpose(perm 0,2,3,1) -> last-axis LN chain -> "
                                        "Transpose(perm 0,3,1,2).",
    "layernorm/dynamo_op18": "LayerNormalization(X, C gamma, C beta; axis=-1, epsilon, stash_type=1).",
    "rmsnorm/torchscript_llama_qwen2": "Cast(X, to=FLOAT even when X is float32) [Cast output has 3 consumers: Pow, Mul "
                                       "and the residual Add outside the norm] -> Pow(K 2.0) -> ReduceMean(axes=[-1] "
                                       "attr, keepdims=1 explicit; at opset 18 axes is K int64 [-1] input) -> Add(K eps) "
                                       "-> Sqrt -> Div(K 1.0, sqrt) -> Mul(Cast_out, .) -> Cast(to=FLOAT) -> "
                                       "Mul(C gamma, .) (gamma FIRST). Identical at opsets 14, 17 and 18.",
    "rmsnorm/torchscript_t5": "as Llama but no trailing Cast: ... Div(K 1.0, sqrt) -> Mul(Cast_out, .) -> "
                              "Mul(C gamma, .).",
    "rmsnorm/torchscript_gemma": "as Llama but no trailing Cast and Mul(., C g) with g SECOND; (1 + weight) is "
                                 "constant-folded, so the initializer already holds 1 + w.",
    "rmsnorm/torchscript_llama_fp16": "Cast(X fp16, to=FLOAT) -> Pow -> ReduceMean -> Add(eps f32) -> Sqrt -> "
                                      "Div(K 1.0) -> Mul(Cast_out, .) -> Cast(to=FLOAT16) -> Mul(C gamma fp16, .). "
                                      "The residual Add uses the fp16 X, not the Cast.",
    "rmsnorm/dynamo_op18": "Pow(X, C 2.0) -> ReduceMean(X, C int64 axes input; [-1] for Llama, [2] (positive) for "
                           "torch.nn.RMSNorm) -> Add(C eps) -> Sqrt -> Reciprocal -> Mul(X, .) -> Mul(C gamma, .) "
                           "for Llama / Mul(., C gamma) for nn.RMSNorm; no Casts. nn.RMSNorm without affine ends at "
                           "Mul(X, .).",
    "rmsnorm/dynamo_op23": "RMSNormalization(X, C gamma; axis=-1, epsilon, stash_type=1).",
    "groupnorm/torchscript_op13_op18": "Reshape(X, K[0, G, -1]) -> InstanceNormalization(., K ones[G], K zeros[G]; "
                                       "epsilon) -> Reshape(., Shape(X)) -> Mul(., C gamma[C,1,1]) -> Add(., C "
                                       "beta[C,1,1]); X (the Conv output) has 2 consumers (Reshape, Shape). No "
                                       "GroupNormalization even at opset 18. Rank-3 input (Wav2Vec2): gamma [C,1].",
    "groupnorm/dynamo_op18": "Reshape(X, C[0, G, -1]) -> InstanceNormalization(C ones, C zeros) -> Reshape(., "
                             "Shape(X)) (a constant shape when exported without dynamic dims) -> Mul(C gamma[C,1,1]) "
                             "-> Add(C beta[C,1,1]).",
}


def main(argv):
    torch.set_num_threads(2)
    selected = [(n, f) for n, f in BUILDERS if not argv or any(a in n for a in argv)]
    old = {}
    if argv and MANIFEST.exists():
        data = json.loads(MANIFEST.read_text())
        old = {e["file"]: e for e in data.get("models", [])}
        FAILED.update({k: v for k, v in data.get("failed", {}).items()})
    for name, fn in selected:
        print(f"[{name}]", flush=True)
        FAILED.pop(name + ".onnx", None)
        try:
            fn()
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"
            FAILED[name + ".onnx"] = msg
            print(f"  FAILED {name}: {msg}", flush=True)
            traceback.print_exc(limit=3)
            p = OUT / (name + ".onnx")
            if p.exists():
                p.unlink()
    models = dict(old)
    for k in FAILED:
        models.pop(k, None)
    models.update(ENTRIES)
    order = {n + ".onnx": i for i, (n, _) in enumerate(BUILDERS)}
    manifest = {
        "generator": "models/torch/export_torch.py",
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "input_convention": "integer inputs: uniform in [low, high) (numpy randint, high exclusive; attention_mask "
                            "low=1 high=2 means all ones); float inputs: standard normal. ORT checked with "
                            "graph_optimization_level=ORT_DISABLE_ALL, CPUExecutionProvider.",
        "ground_truth_convention": "module counts from model.modules(): batchnorm = nn.BatchNorm*d, layernorm = "
                                   "nn.LayerNorm and *LayerNorm classes (not RMS), rmsnorm = *RMSNorm classes and "
                                   "T5LayerNorm, groupnorm = nn.GroupNorm. batchnorm_after_linear = BN modules that "
                                   "directly consume a Conv/ConvTranspose/Linear output used by nothing else; "
                                   "batchnorm_before_linear = the other BN modules whose output only a Linear (on "
                                   "[N, C]) or a Conv without padding reads (counted by hand per model).",
        "spellings": SPELLINGS,
        "models": sorted(models.values(), key=lambda e: order.get(e["file"], 999)),
        "failed": dict(sorted(FAILED.items())),
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(e["size_bytes"] for e in manifest["models"])
    print(f"wrote {MANIFEST} with {len(manifest['models'])} models ({total/1e6:.2f} MB), {len(FAILED)} failed")


if __name__ == "__main__":
    main(sys.argv[1:])
