#!/usr/bin/env python
"""Build small Keras models with random weights, export them with tf2onnx, write manifest.json.

Run from the repo root with the TF venv (see models/tf/README.md):

    /work/venvs/tf/bin/python models/tf/export_tf.py            # rebuild everything
    /work/venvs/tf/bin/python models/tf/export_tf.py ln gn      # only models whose name contains "ln" or "gn"
    /work/venvs/tf/bin/python models/tf/export_tf.py =keras3_convnext   # only the spec of exactly that name
                                                                 # (manifest entries of the others are kept)

Every model gets deterministic random weights: all BatchNormalization layers get random
moving_mean, positive random moving_variance and random gamma/beta (so TF/tf2onnx cannot
optimize BN away as an identity), Layer/Group/RMS norms get random gamma/beta, and every
Conv/Dense bias is random (so use_bias=True convs really carry a bias).

Each exported file is checked with onnx.checker.check_model and run in onnxruntime with graph
optimizations disabled (ORT_ENABLE_ALL would fuse LayerNorm itself); the max abs difference to
the Keras output (training=False) is recorded in the manifest.
"""
import collections
import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402  (Keras 3)
import tf_keras  # noqa: E402  (Keras 2)
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tf2onnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "manifest.json")

LINEAR_CLASSES = {
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Dense",
}
NORM_KIND = {
    "BatchNormalization": "batchnorm",
    "LayerNormalization": "layernorm",
    "RMSNormalization": "rmsnorm",
    "HandRMSNorm": "rmsnorm",
    "GroupNormalization": "groupnorm",
    "LlamaLayerNorm": "rmsnorm",  # keras_hub Llama: x * rsqrt(mean(x^2) + eps) * scale
}
# keras_hub's Gemma norm class is also named "RMSNormalization" (it multiplies by 1 + scale).


# ----------------------------------------------------------------------------------------------
# Hand-written RMSNorm layer (Keras 3): x * rsqrt(mean(x^2) + eps) * gamma
# ----------------------------------------------------------------------------------------------
class HandRMSNorm(keras.layers.Layer):
    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        ops = keras.ops
        ms = ops.mean(ops.square(x), axis=-1, keepdims=True)
        return x * ops.rsqrt(ms + self.epsilon) * ops.cast(self.gamma, x.dtype)


# ----------------------------------------------------------------------------------------------
# Weight randomization / ground truth
# ----------------------------------------------------------------------------------------------
def _all_layers(model):
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers") and isinstance(getattr(layer, "layers"), list) and layer.layers:
            out.extend(_all_layers(layer))
    return out


def _deep_layers(model):
    """Every layer inside `model`, sublayers of subclassed layers included (keras_hub blocks), once."""
    seen, out = set(), []
    for layer in _all_layers(model):
        flat = getattr(layer, "_flatten_layers", None)
        for sub in (flat(include_self=True, recursive=True) if flat else [layer]):
            if id(sub) not in seen:
                seen.add(id(sub))
                out.append(sub)
    return out


def _wname(w):
    return getattr(w, "path", None) or w.name


def randomize(model, seed, deep=False):
    """deep=True walks sublayers of subclassed layers too (needed for keras_hub blocks, whose norms
    are attributes of a TransformerLayer); the older models keep the shallow walk (same weights)."""
    rng = np.random.default_rng(seed)
    seen = set()
    # deep: innermost layers first, so a norm's own weights are claimed by the norm, not its block
    for layer in (_deep_layers(model)[::-1] if deep else _all_layers(model)):
        cls = type(layer).__name__
        for w in layer.weights:
            if deep:
                if id(w) in seen:
                    continue
                seen.add(id(w))
            name = _wname(w).split("/")[-1].split(":")[0]
            shape = tuple(int(d) for d in w.shape)
            dt = w.dtype if isinstance(w.dtype, str) else w.dtype.name
            if cls in NORM_KIND:
                if "moving_variance" in name:
                    v = rng.uniform(0.5, 2.0, shape)
                elif "moving_mean" in name:
                    v = rng.normal(0.0, 0.5, shape)
                elif name in ("gamma", "scale"):
                    v = rng.uniform(0.5, 1.5, shape)
                elif name in ("beta", "bias", "offset"):
                    v = rng.normal(0.0, 0.3, shape)
                else:
                    continue
            elif name == "bias":  # Conv*/Dense/EinsumDense (MHA) biases
                v = rng.normal(0.0, 0.1, shape)
            else:
                continue
            w.assign(v.astype(dt))


def _history_layer(t):
    h = getattr(t, "_keras_history", None)
    return None if h is None else h[0]


def _node_inputs(node):
    for attr in ("input_tensors", "keras_inputs"):
        v = getattr(node, attr, None)
        if v is not None:
            return tf.nest.flatten(v)
    return []


def ground_truth(model):
    layers = _all_layers(model)
    # batchnorm_before_linear stays 0: no BatchNormalization layer here is read only by a Dense on
    # [N, C] or an unpadded Conv without also following a linear layer (checked by hand per model).
    gt = {"batchnorm": 0, "batchnorm_after_linear": 0, "batchnorm_before_linear": 0, "layernorm": 0,
          "rmsnorm": 0, "groupnorm": 0}
    for layer in _deep_layers(model):
        kind = NORM_KIND.get(type(layer).__name__)
        if kind:
            gt[kind] += 1
    # consumers of each layer's output (inside the model graphs) plus model outputs
    ids = {id(l) for l in layers}
    consumers = collections.Counter()
    for layer in layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for t in _node_inputs(node):
                p = _history_layer(t)
                if p is not None and id(p) in ids:
                    consumers[id(p)] += 1
    for m in [model] + [l for l in layers if hasattr(l, "layers")]:
        for t in tf.nest.flatten(getattr(m, "outputs", []) or []):
            p = _history_layer(t)
            if p is not None:
                consumers[id(p)] += 1
    for layer in layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        nodes = getattr(layer, "_inbound_nodes", [])
        if len(nodes) != 1:
            continue
        ins = _node_inputs(nodes[0])
        if len(ins) != 1:
            continue
        p = _history_layer(ins[0])
        if p is None or type(p).__name__ not in LINEAR_CLASSES:
            continue
        act = getattr(getattr(p, "activation", None), "__name__", "linear")
        if act != "linear":
            continue
        if consumers[id(p)] == 1:
            gt["batchnorm_after_linear"] += 1
    return gt


# ----------------------------------------------------------------------------------------------
# Model builders. `K` is either keras (Keras 3) or tf_keras (Keras 2): the layer API is the same.
# Each returns (model, {input_name: shape}).
# ----------------------------------------------------------------------------------------------
def build_bn_stack(K, batch=1):
    """9 BN, 6 of them directly after a linear layer with no other consumer."""
    L = K.layers
    x = K.Input(shape=(32, 32, 3), batch_size=batch, name="input_1")
    a = L.Conv2D(8, 3, padding="same", use_bias=True, name="conv_bias")(x)
    a = L.BatchNormalization(name="bn_conv_bias")(a)  # after linear
    a = L.ReLU()(a)
    b = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv_nobias")(a)
    b = L.BatchNormalization(name="bn_conv_nobias")(b)  # after linear
    b = L.ReLU()(b)
    c = L.DepthwiseConv2D(3, padding="same", name="dwconv")(b)
    c = L.BatchNormalization(name="bn_dwconv")(c)  # after linear
    c = L.ReLU()(c)
    d = L.SeparableConv2D(16, 3, padding="same", name="sepconv")(c)
    d = L.BatchNormalization(name="bn_sepconv")(d)  # after linear
    d = L.ReLU()(d)
    e = L.Conv2DTranspose(16, 3, strides=2, padding="same", name="convT")(d)
    e = L.BatchNormalization(name="bn_convT")(e)  # after linear
    e = L.ReLU()(e)
    f = L.Conv2D(16, 3, padding="same", name="conv_shared")(e)  # feeds BN and the residual Add
    fb = L.BatchNormalization(name="bn_conv_shared")(f)  # NOT after linear (conv has 2 consumers)
    fb = L.ReLU()(fb)
    g = L.Add(name="residual_add")([f, fb])
    p = L.MaxPooling2D(2, name="maxpool")(g)
    p = L.BatchNormalization(name="bn_preact_pool")(p)  # pre-activation after MaxPool
    p = L.ReLU()(p)
    q = L.Conv2D(16, 1, name="conv_1x1")(p)
    r = L.Add(name="preact_add")([p, q])
    r = L.BatchNormalization(name="bn_preact_add")(r)  # pre-activation after Add
    r = L.ReLU()(r)
    h = L.GlobalAveragePooling2D()(r)
    h = L.Dense(10, name="dense_head")(h)
    h = L.BatchNormalization(name="bn_dense")(h)  # after linear, rank 2
    return K.Model(x, h, name="bn_stack"), {"input_1": (batch, 32, 32, 3)}


def build_bn_conv3d(K, batch=1):
    L = K.layers
    x = K.Input(shape=(8, 8, 8, 2), batch_size=batch, name="input_1")
    y = L.Conv3D(4, 3, padding="same", use_bias=True, name="conv3d_bias")(x)
    y = L.BatchNormalization(name="bn_conv3d_bias")(y)
    y = L.ReLU()(y)
    y = L.Conv3D(4, 3, padding="same", use_bias=False, name="conv3d_nobias")(y)
    y = L.BatchNormalization(name="bn_conv3d_nobias")(y)
    return K.Model(x, y, name="bn_conv3d"), {"input_1": (batch, 8, 8, 8, 2)}


def build_bn_conv1d_dense(K, batch=1):
    L = K.layers
    x = K.Input(shape=(16, 4), batch_size=batch, name="input_1")
    y = L.Conv1D(8, 3, padding="same", use_bias=True, name="conv1d_bias")(x)
    y = L.BatchNormalization(name="bn_conv1d_bias")(y)
    y = L.ReLU()(y)
    y = L.Conv1D(8, 3, padding="same", use_bias=False, name="conv1d_nobias")(y)
    y = L.BatchNormalization(name="bn_conv1d_nobias")(y)
    y = L.ReLU()(y)
    y = L.Dense(8, name="dense_rank3")(y)  # MatMul on (N, T, C)
    y = L.BatchNormalization(name="bn_dense_rank3")(y)
    y = L.ReLU()(y)
    y = L.Flatten()(y)
    y = L.Dense(10, use_bias=False, name="dense_nobias")(y)
    y = L.BatchNormalization(name="bn_dense_rank2")(y)
    return K.Model(x, y, name="bn_conv1d_dense"), {"input_1": (batch, 16, 4)}


def build_mobilenetv2(K, batch=1):
    m = K.applications.MobileNetV2(alpha=0.35, input_shape=(64, 64, 3), classes=10, weights=None)
    return m, {"input": (batch, 64, 64, 3)}


def build_mobilenetv3small(K, batch=1):
    # include_top=False + our own Dense head: the top of MobileNetV3 has no BN but a 1024-ch 1x1
    # conv that would make the file ~3 MB.
    base = K.applications.MobileNetV3Small(alpha=0.75, minimalistic=True, input_shape=(64, 64, 3),
                                           include_top=False, pooling="avg", weights=None)
    y = K.layers.Dense(10, name="head")(base.output)
    return K.Model(base.input, y, name="mobilenetv3small_head"), {"input": (batch, 64, 64, 3)}


def _seq_ln(K, batch=2, **ln_kwargs):
    L = K.layers
    x = K.Input(shape=(16, 32), batch_size=batch, name="input_1")
    y = L.Dense(32, name="dense_in")(x)
    y = L.LayerNormalization(name="ln", **ln_kwargs)(y)
    y = L.Dense(32, name="dense_out")(y)
    return K.Model(x, y), {"input_1": (batch, 16, 32)}


def build_ln_last(K):
    return _seq_ln(K)


def build_ln_nocenter(K):
    return _seq_ln(K, center=False)


def build_ln_noscale(K):
    return _seq_ln(K, scale=False)


def build_ln_plain(K):
    return _seq_ln(K, center=False, scale=False)


def build_ln_2axes(K):
    return _seq_ln(K, axis=[-2, -1])


def build_ln_fused(K):  # tf_keras: eps >= 1.001e-5 and trailing axes -> fused (BatchNormalization) path
    return _seq_ln(K, epsilon=1e-3)


def build_ln_nonfused(K):  # tf_keras: eps < 1.001e-5 -> non-fused (moments) path
    return _seq_ln(K, epsilon=1e-6)


def build_transformer_block(K, batch=2):
    L = K.layers
    x = K.Input(shape=(16, 32), batch_size=batch, name="input_1")
    att = L.MultiHeadAttention(num_heads=4, key_dim=8, name="mha")(x, x)
    h = L.LayerNormalization(epsilon=1e-6, name="ln_attn")(L.Add()([x, att]))
    f = L.Dense(64, activation="relu", name="ffn_1")(h)
    f = L.Dense(32, name="ffn_2")(f)
    y = L.LayerNormalization(epsilon=1e-6, name="ln_ffn")(L.Add()([h, f]))
    return K.Model(x, y, name="transformer_block"), {"input_1": (batch, 16, 32)}


def build_conv_ln_c(K, batch=1):
    L = K.layers
    x = K.Input(shape=(16, 16, 3), batch_size=batch, name="input_1")
    y = L.Conv2D(8, 3, padding="same", name="conv")(x)
    y = L.LayerNormalization(axis=-1, name="ln_channels")(y)
    y = L.ReLU()(y)
    y = L.Conv2D(8, 3, padding="same", name="conv2")(y)
    return K.Model(x, y), {"input_1": (batch, 16, 16, 3)}


def build_conv_ln_hwc(K, batch=1):
    L = K.layers
    x = K.Input(shape=(16, 16, 3), batch_size=batch, name="input_1")
    y = L.Conv2D(8, 3, padding="same", name="conv")(x)
    y = L.LayerNormalization(axis=[1, 2, 3], name="ln_hwc")(y)
    y = L.ReLU()(y)
    y = L.Conv2D(8, 3, padding="same", name="conv2")(y)
    return K.Model(x, y), {"input_1": (batch, 16, 16, 3)}


def build_rmsnorm(K, batch=2):
    L = K.layers
    x = K.Input(shape=(16, 32), batch_size=batch, name="input_1")
    y = L.Dense(32, name="dense_in")(x)
    y = L.RMSNormalization(epsilon=1e-6, name="rmsnorm")(y)
    y = L.Dense(32, name="dense_out")(y)
    return K.Model(x, y), {"input_1": (batch, 16, 32)}


def build_rmsnorm_hand(K, batch=2):
    L = K.layers
    x = K.Input(shape=(16, 32), batch_size=batch, name="input_1")
    y = L.Dense(32, name="dense_in")(x)
    y = HandRMSNorm(epsilon=1e-6, name="hand_rmsnorm")(y)
    y = L.Dense(32, name="dense_out")(y)
    return K.Model(x, y), {"input_1": (batch, 16, 32)}


def build_groupnorm(K, batch=1):
    L = K.layers
    x = K.Input(shape=(16, 16, 3), batch_size=batch, name="input_1")
    y = L.Conv2D(16, 3, padding="same", name="conv")(x)
    y = L.GroupNormalization(groups=4, name="gn")(y)
    y = L.ReLU()(y)
    y = L.Conv2D(8, 3, padding="same", name="conv2")(y)
    return K.Model(x, y), {"input_1": (batch, 16, 16, 3)}


def build_groupnorm_dyn(K):
    """Same layers as build_groupnorm, but a dynamic batch: Input shape (None, 16, 16, 3)."""
    return build_groupnorm(K, batch=None)


def _layer_scale(K, c, name):
    """keras.applications.convnext's LayerScale: x * gamma (per channel, here a constant 0.5)."""
    class LayerScale(K.layers.Layer):
        def build(self, input_shape):
            self.gamma = self.add_weight(name="gamma", shape=(c,), initializer=K.initializers.Constant(0.5))

        def call(self, x):
            return x * self.gamma

    return LayerScale(name=name)


def build_convnext(K, batch=1, layer_scale=False, exact_gelu=False):
    """ConvNeXt-style network: 7 LayerNorms over channels (stem, 4 blocks, downsample, head).

    Block: DepthwiseConv2D 7x7 -> LayerNormalization(channels, eps 1e-6) -> Dense(4C) -> GELU ->
    Dense(C) -> residual Add (the keras.applications ConvNeXt block without its LayerScale, and with
    the tanh GELU)."""
    L = K.layers
    x = K.Input(shape=(32, 32, 3), batch_size=batch, name="input_1")
    y = L.Conv2D(16, 4, strides=4, name="stem_conv")(x)  # (a None batch is dynamic)
    y = L.LayerNormalization(epsilon=1e-6, name="stem_ln")(y)

    def block(y, c, tag):
        r = y
        y = L.DepthwiseConv2D(7, padding="same", name=f"{tag}_dw")(y)
        y = L.LayerNormalization(epsilon=1e-6, name=f"{tag}_ln")(y)
        y = L.Dense(4 * c, name=f"{tag}_pw1")(y)
        # tanh GELU by default: the exact one lowers to TF's Erfc, which tf2onnx 1.17 converts only
        # through this script's Erfc handler (1 - Erf)
        y = L.Activation(lambda t: K.activations.gelu(t, approximate=not exact_gelu), name=f"{tag}_gelu")(y)
        y = L.Dense(c, name=f"{tag}_pw2")(y)
        if layer_scale:
            y = _layer_scale(K, c, f"{tag}_layer_scale")(y)
        return L.Add(name=f"{tag}_add")([r, y])

    y = block(y, 16, "s0b0")
    y = block(y, 16, "s0b1")
    y = L.LayerNormalization(epsilon=1e-6, name="down_ln")(y)
    y = L.Conv2D(32, 2, strides=2, name="down_conv")(y)
    y = block(y, 32, "s1b0")
    y = block(y, 32, "s1b1")
    y = L.GlobalAveragePooling2D(name="gap")(y)
    y = L.LayerNormalization(epsilon=1e-6, name="head_ln")(y)
    y = L.Dense(10, name="head")(y)
    return K.Model(x, y, name="convnext_tiny_blocks"), {"input_1": (batch, 32, 32, 3)}


def build_convnext_dyn(K):
    """build_convnext with what keras.applications' ConvNeXt adds: a dynamic batch, LayerScale
    (per-channel gamma 0.5 after the second Dense) and the exact (erf) GELU. (The applications'
    own code uses a grouped Conv2D for the depthwise conv, which TF 2.21 writes as a function call
    tf2onnx 1.17 cannot convert.)"""
    return build_convnext(K, batch=None, layer_scale=True, exact_gelu=True)


def build_dense_bn(K, batch=2):
    """Dense(bias)->BN->ReLU->Dense(no bias)->BN: two BNs after a sole-use Dense (rank 2)."""
    L = K.layers
    x = K.Input(shape=(16,), batch_size=batch, name="input_1")
    y = L.Dense(32, name="dense_bias")(x)
    y = L.BatchNormalization(name="bn_dense_bias")(y)
    y = L.ReLU()(y)
    y = L.Dense(16, use_bias=False, name="dense_nobias")(y)
    y = L.BatchNormalization(name="bn_dense_nobias")(y)
    return K.Model(x, y, name="dense_bn"), {"input_1": (batch, 16)}


# keras_hub backbones: built from configs (random weights, no preset download), int32 token inputs.
def _tokens(vocab, b=2, s=8, segments=False):
    spec = {"token_ids": dict(shape=(b, s), dtype="int32", low=0, high=vocab)}
    if segments:
        spec["segment_ids"] = dict(shape=(b, s), dtype="int32", low=0, high=2)
    spec["padding_mask"] = dict(shape=(b, s), dtype="int32", low=1, high=2)
    return spec


HUB_CFG = {
    "bert": "BertBackbone(vocabulary_size=128, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, "
            "max_sequence_length=16)",
    "vit": "ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, "
           "mlp_dim=64)",
    "gemma": "GemmaBackbone(vocabulary_size=128, num_layers=2, num_query_heads=2, num_key_value_heads=1, "
             "hidden_dim=32, intermediate_dim=64, head_dim=16)",
    "llama": "LlamaBackbone(vocabulary_size=128, num_layers=2, num_query_heads=2, num_key_value_heads=1, "
             "hidden_dim=32, intermediate_dim=64)",
}


def _hub(kind):
    import keras_hub  # noqa: F401  (only the keras_hub specs need it)
    return eval("keras_hub.models." + HUB_CFG[kind])


def build_hub_bert(K):
    return _hub("bert"), _tokens(128, segments=True)


def build_hub_vit(K):
    return _hub("vit"), {"images": (1, 32, 32, 3)}


def build_hub_gemma(K):
    return _hub("gemma"), _tokens(128)


def build_hub_llama(K):
    return _hub("llama"), _tokens(128)


def build_groupnorm_hw_dyn(K):
    """GroupNorm(4 groups) and GroupNorm(groups=-1, i.e. instance norm) on a fully dynamic image
    (None, None, None, 3): every reshape target comes from Shape."""
    L = K.layers
    x = K.Input(shape=(None, None, 3), name="input_1")
    y = L.Conv2D(16, 3, padding="same", name="conv")(x)
    y = L.GroupNormalization(groups=4, name="gn")(y)
    y = L.ReLU()(y)
    y = L.Conv2D(8, 3, padding="same", name="conv2")(y)
    y = L.GroupNormalization(groups=-1, epsilon=1e-5, name="gn_instance")(y)
    return K.Model(x, y), {"input_1": dict(shape=(None, None, None, 3), dtype="float32", feed=(2, 12, 12, 3))}


def build_ln_axis1(K, batch=2):
    """LayerNorm over the sequence axis (axis=1) of [N, T, D]: a non-trailing axis."""
    return _seq_ln(K, batch=batch, axis=1)


def build_bn_dyn(K):
    """The BN stack with a dynamic batch."""
    return build_bn_stack(K, batch=None)


def build_seq_ln_dyn(K):
    """Dense -> LayerNorm -> Dense on (None, None, 32): dynamic batch and sequence."""
    L = K.layers
    x = K.Input(shape=(None, 32), name="input_1")
    y = L.Dense(32, name="dense_in")(x)
    y = L.LayerNormalization(epsilon=1e-6, name="ln")(y)
    y = L.RMSNormalization(epsilon=1e-6, name="rms")(L.Dense(32, name="dense_mid")(y)) if K is keras else y
    y = L.Dense(32, name="dense_out")(y)
    return K.Model(x, y), {"input_1": dict(shape=(None, None, 32), dtype="float32", feed=(2, 8, 32))}


# ----------------------------------------------------------------------------------------------
# Specs: (name, K, builder, opsets, extra)
# ----------------------------------------------------------------------------------------------
K3, K2 = keras, tf_keras
SRC = "Keras 3 functional model built in export_tf.py ({})"
SRC2 = "tf_keras (Keras 2) functional model built in export_tf.py ({})"

SPECS = [
    # 1. Keras 3 BN stacks
    dict(name="keras3_bn_stack", K=K3, build=build_bn_stack, opsets=[13, 17, 18],
         notes="Keras 3: no BatchNormalization op; 8 BNs stay as Mul(C[1,C,1,1])->Add(C[1,C,1,1]) (after Conv+bias, depthwise Conv, pointwise Conv of SeparableConv, ConvTranspose, shared Conv, MaxPool, Add) plus Gemm->Mul(C[10])->Add(C[10]); BN after the bias-free Conv2D is already folded (Conv gets a bias). GlobalAveragePooling2D is GlobalAveragePool->Squeeze (ReduceMean at op18)."),
    dict(name="keras3_bn_conv3d", K=K3, build=build_bn_conv3d, opsets=[13, 17],
         notes="Conv3D(bias)->Mul(C[1,4,1,1,1])->Add remains; the bias-free Conv3D+BN is already folded."),
    dict(name="keras3_bn_conv1d_dense", K=K3, build=build_bn_conv1d_dense, opsets=[13, 17],
         notes="Conv1D is Unsqueeze->Conv(kernel [1,3], no bias input)->Squeeze(axis 2)->[Add(C[1,8,1]) bias]->Mul(C[1,8,1])->Add(C[1,8,1]); Dense on rank 3 is Reshape->MatMul->Reshape->Add(C[8])->Mul(C[8])->Add(C[8]); rank-2 Dense(no bias) is MatMul->Mul(C[10])->Add(C[10])."),
    dict(name="keras3_bn_stack_noopt", K=K3, build=build_bn_stack, opsets=[13], optimizers={},
         notes="tf2onnx optimizers disabled (optimizers={}): raw Transpose->Conv->Transpose, NHWC Mul/Add"),
    # 2. tf_keras BN stacks
    dict(name="tfkeras_bn_stack", K=K2, build=build_bn_stack, opsets=[13, 17],
         notes="tf_keras: 5 real BatchNormalization nodes (C[C] params) after SeparableConv pointwise Conv, ConvTranspose, the shared Conv (2 consumers), MaxPool, Add; Conv(+/-bias)+BN and depthwise+BN folded by tf2onnx; Dense BN is Gemm->Mul(C[10])->Add(C[10])."),
    dict(name="tfkeras_bn_conv3d", K=K2, build=build_bn_conv3d, opsets=[13, 17],
         notes="Both Conv3D (with and without bias) followed by a real BatchNormalization node."),
    dict(name="tfkeras_bn_conv1d_dense", K=K2, build=build_bn_conv1d_dense, opsets=[13, 17],
         notes="Same spelling as the Keras 3 file: rank-3 BN becomes Mul(C[1,8,1])->Add after Conv->Squeeze(->Add bias); Dense BN Mul(C[8])->Add."),
    # 3. applications
    dict(name="keras3_mobilenetv2", K=K3, build=build_mobilenetv2, opsets=[13, 17],
         source="keras.applications.MobileNetV2(alpha=0.35, input_shape=(64,64,3), classes=10, weights=None)"),
    dict(name="keras3_mobilenetv3small", K=K3, build=build_mobilenetv3small, opsets=[13, 17],
         source="keras.applications.MobileNetV3Small(alpha=0.75, minimalistic=True, input_shape=(64,64,3), "
                "include_top=False, pooling='avg', weights=None) + Dense(10)"),
    dict(name="tfkeras_mobilenetv2", K=K2, build=build_mobilenetv2, opsets=[13],
         source="tf_keras.applications.MobileNetV2(alpha=0.35, input_shape=(64,64,3), classes=10, weights=None)"),
    # 4. LayerNorm
    dict(name="keras3_ln_last", K=K3, build=build_ln_last, opsets=[13, 17, 18]),
    dict(name="keras3_ln_nocenter", K=K3, build=build_ln_nocenter, opsets=[13, 17]),
    dict(name="keras3_ln_noscale", K=K3, build=build_ln_noscale, opsets=[13, 17]),
    dict(name="keras3_ln_plain", K=K3, build=build_ln_plain, opsets=[13, 17]),
    dict(name="keras3_ln_2axes", K=K3, build=build_ln_2axes, opsets=[13, 17, 18]),
    dict(name="tfkeras_ln_fused", K=K2, build=build_ln_fused, opsets=[13, 17]),
    dict(name="tfkeras_ln_nonfused", K=K2, build=build_ln_nonfused, opsets=[13, 17]),
    dict(name="keras3_transformer_block", K=K3, build=build_transformer_block, opsets=[13, 17, 18]),
    dict(name="tfkeras_transformer_block", K=K2, build=build_transformer_block, opsets=[17]),
    # 5. LayerNorm after conv
    dict(name="keras3_conv_ln_c", K=K3, build=build_conv_ln_c, opsets=[13, 17]),
    dict(name="keras3_conv_ln_hwc", K=K3, build=build_conv_ln_hwc, opsets=[13, 17, 18]),
    # 6. RMSNorm
    dict(name="keras3_rmsnorm", K=K3, build=build_rmsnorm, opsets=[13, 17, 18]),
    dict(name="keras3_rmsnorm_hand", K=K3, build=build_rmsnorm_hand, opsets=[13, 17]),
    # 7. GroupNorm
    dict(name="keras3_groupnorm", K=K3, build=build_groupnorm, opsets=[13, 17, 18]),
    dict(name="tfkeras_groupnorm", K=K2, build=build_groupnorm, opsets=[17]),
    # 8. mixed precision
    dict(name="keras3_bn_stack_fp16", K=K3, build=build_bn_stack, opsets=[13, 17], mixed=True),
    dict(name="keras3_ln_last_fp16", K=K3, build=build_ln_last, opsets=[13, 17], mixed=True),
    # 9. issue 15 corpus: tf2onnx with its optimizers off
    dict(name="keras3_ln_last_noopt", K=K3, build=build_ln_last, opsets=[13, 17], optimizers={}),
    dict(name="keras3_ln_nocenter_noopt", K=K3, build=build_ln_nocenter, opsets=[17], optimizers={}),
    dict(name="keras3_transformer_block_noopt", K=K3, build=build_transformer_block, opsets=[17, 18],
         optimizers={}),
    dict(name="tfkeras_ln_nonfused_noopt", K=K2, build=build_ln_nonfused, opsets=[17], optimizers={}),
    dict(name="tfkeras_ln_fused_noopt", K=K2, build=build_ln_fused, opsets=[17], optimizers={}),
    dict(name="keras3_conv_ln_c_noopt", K=K3, build=build_conv_ln_c, opsets=[17], optimizers={}),
    dict(name="keras3_rmsnorm_noopt", K=K3, build=build_rmsnorm, opsets=[17], optimizers={}),
    dict(name="keras3_groupnorm_noopt", K=K3, build=build_groupnorm, opsets=[17], optimizers={}),
    # 10. ConvNeXt-style blocks (LayerNorm over channels after a depthwise 7x7 conv)
    dict(name="keras3_convnext", K=K3, build=build_convnext, opsets=[13, 17, 18]),
    dict(name="keras3_convnext_noopt", K=K3, build=build_convnext, opsets=[17], optimizers={}),
    dict(name="tfkeras_convnext", K=K2, build=build_convnext, opsets=[13]),
    dict(name="keras3_convnext_dyn", K=K3, build=build_convnext_dyn, opsets=[13, 17]),
    dict(name="keras3_convnext_dyn_noopt", K=K3, build=build_convnext_dyn, opsets=[17], optimizers={}),
    dict(name="tfkeras_convnext_dyn", K=K2, build=build_convnext_dyn, opsets=[13]),
    # 11. GroupNormalization with a dynamic batch (Input shape (None, 16, 16, 3))
    dict(name="keras3_groupnorm_dyn", K=K3, build=build_groupnorm_dyn, opsets=[13, 17, 18]),
    dict(name="keras3_groupnorm_dyn_noopt", K=K3, build=build_groupnorm_dyn, opsets=[17], optimizers={}),
    dict(name="tfkeras_groupnorm_dyn", K=K2, build=build_groupnorm_dyn, opsets=[17, 18]),
    dict(name="keras3_groupnorm_hwdyn", K=K3, build=build_groupnorm_hw_dyn, opsets=[17, 18]),
    dict(name="keras3_groupnorm_hwdyn_noopt", K=K3, build=build_groupnorm_hw_dyn, opsets=[17], optimizers={}),
    dict(name="tfkeras_groupnorm_hwdyn", K=K2, build=build_groupnorm_hw_dyn, opsets=[17]),
    dict(name="tfkeras_groupnorm_dyn_noopt", K=K2, build=build_groupnorm_dyn, opsets=[17], optimizers={}),
    dict(name="keras3_seq_dyn", K=K3, build=build_seq_ln_dyn, opsets=[13, 18]),
    dict(name="keras3_seq_dyn_noopt", K=K3, build=build_seq_ln_dyn, opsets=[18], optimizers={}),
    dict(name="tfkeras_seq_dyn", K=K2, build=build_seq_ln_dyn, opsets=[17]),
    dict(name="keras3_ln_axis1", K=K3, build=build_ln_axis1, opsets=[17]),
    dict(name="keras3_ln_axis1_noopt", K=K3, build=build_ln_axis1, opsets=[17], optimizers={}),
    dict(name="keras3_bn_dyn", K=K3, build=build_bn_dyn, opsets=[17]),
    dict(name="tfkeras_bn_dyn_noopt", K=K2, build=build_bn_dyn, opsets=[13], optimizers={}),
    dict(name="tfkeras_bn_stack_noopt", K=K2, build=build_bn_stack, opsets=[17], optimizers={}),
    dict(name="keras3_conv_ln_hwc_noopt", K=K3, build=build_conv_ln_hwc, opsets=[17], optimizers={}),
    dict(name="keras3_ln_2axes_noopt", K=K3, build=build_ln_2axes, opsets=[18], optimizers={}),
    # 12. keras_hub tiny backbones (random weights from configs)
    dict(name="kerashub_gemma", K=K3, build=build_hub_gemma, opsets=[13, 17, 18], deep=True,
         source="keras_hub.models." + HUB_CFG["gemma"]),
    dict(name="kerashub_gemma_noopt", K=K3, build=build_hub_gemma, opsets=[17], deep=True, optimizers={},
         source="keras_hub.models." + HUB_CFG["gemma"]),
    dict(name="kerashub_llama", K=K3, build=build_hub_llama, opsets=[17], deep=True,
         source="keras_hub.models." + HUB_CFG["llama"]),
    dict(name="kerashub_llama_noopt", K=K3, build=build_hub_llama, opsets=[17, 18], deep=True, optimizers={},
         source="keras_hub.models." + HUB_CFG["llama"]),
    dict(name="kerashub_bert", K=K3, build=build_hub_bert, opsets=[13, 17], deep=True,
         source="keras_hub.models." + HUB_CFG["bert"]),
    dict(name="kerashub_bert_noopt", K=K3, build=build_hub_bert, opsets=[17], deep=True, optimizers={},
         source="keras_hub.models." + HUB_CFG["bert"]),
    dict(name="kerashub_vit", K=K3, build=build_hub_vit, opsets=[17], deep=True,
         source="keras_hub.models." + HUB_CFG["vit"]),
    dict(name="kerashub_vit_noopt", K=K3, build=build_hub_vit, opsets=[13, 17], deep=True, optimizers={},
         source="keras_hub.models." + HUB_CFG["vit"]),
    dict(name="kerashub_gemma_float16", K=K3, build=build_hub_gemma, opsets=[17], deep=True, policy="float16",
         source="keras_hub.models." + HUB_CFG["gemma"]),
    dict(name="kerashub_llama_fp16", K=K3, build=build_hub_llama, opsets=[17], deep=True,
         policy="mixed_float16", source="keras_hub.models." + HUB_CFG["llama"]),
    # (keras_hub Gemma through Model.export fails inside tf2onnx 1.17: KeyError on a folded constant)
    dict(name="kerashub_bert_kexport", K=K3, build=build_hub_bert, opsets=[17], deep=True,
         exporter="keras_export", source="keras_hub.models." + HUB_CFG["bert"]),
    # 13. Keras 3's own Model.export(format="onnx")
    dict(name="keras3_ln_last_kexport", K=K3, build=build_ln_last, opsets=[17], exporter="keras_export"),
    dict(name="keras3_transformer_block_kexport", K=K3, build=build_transformer_block, opsets=[17],
         exporter="keras_export"),
    dict(name="keras3_groupnorm_dyn_kexport", K=K3, build=build_groupnorm_dyn, opsets=[17],
         exporter="keras_export"),
    dict(name="keras3_convnext_kexport", K=K3, build=build_convnext, opsets=[17], exporter="keras_export"),
    dict(name="keras3_bn_stack_kexport", K=K3, build=build_bn_stack, opsets=[17], exporter="keras_export"),
    dict(name="keras3_rmsnorm_kexport", K=K3, build=build_rmsnorm, opsets=[17], exporter="keras_export"),
    # 14. float16 and mixed_float16 dtype policies
    dict(name="keras3_ln_last_float16", K=K3, build=build_ln_last, opsets=[13, 17], policy="float16"),
    dict(name="keras3_bn_stack_float16", K=K3, build=build_bn_stack, opsets=[13, 17], policy="float16"),
    dict(name="keras3_dense_bn_float16", K=K3, build=build_dense_bn, opsets=[13, 17], policy="float16"),
    dict(name="keras3_dense_bn_fp16", K=K3, build=build_dense_bn, opsets=[13, 17], policy="mixed_float16"),
    dict(name="keras3_transformer_block_float16", K=K3, build=build_transformer_block, opsets=[17],
         policy="float16"),
    dict(name="keras3_groupnorm_float16", K=K3, build=build_groupnorm, opsets=[17], policy="float16"),
    dict(name="keras3_rmsnorm_float16", K=K3, build=build_rmsnorm, opsets=[17], policy="float16"),
    dict(name="keras3_convnext_float16", K=K3, build=build_convnext, opsets=[17], policy="float16"),
    dict(name="keras3_ln_last_float16_noopt", K=K3, build=build_ln_last, opsets=[17], policy="float16",
         optimizers={}),
    dict(name="tfkeras_ln_fused_float16", K=K2, build=build_ln_fused, opsets=[17], policy="float16"),
    dict(name="tfkeras_ln_nonfused_float16", K=K2, build=build_ln_nonfused, opsets=[17], policy="float16"),
    dict(name="tfkeras_groupnorm_fp16", K=K2, build=build_groupnorm, opsets=[17], policy="mixed_float16"),
    dict(name="tfkeras_ln_nonfused_fp16", K=K2, build=build_ln_nonfused, opsets=[17], policy="mixed_float16"),
    dict(name="tfkeras_bn_stack_fp16", K=K2, build=build_bn_stack, opsets=[13], policy="mixed_float16"),
    dict(name="tfkeras_dense_bn_fp16", K=K2, build=build_dense_bn, opsets=[13], policy="mixed_float16"),
]


# What tf2onnx 1.17 wrote for each model (observed; opset 13 and 17 are identical unless said).
# d = X - mean; "GAP" = GlobalAveragePool, which tf2onnx uses for ReduceMean over the last axis of a
# rank-3 tensor at opsets 13/17 (at opset 18 it is ReduceMean with an int64 axes initializer).
NOTES = {
    "keras3_bn_stack_noopt": (
        "tf2onnx optimizers disabled (optimizers={}): every conv is Transpose(NHWC->NCHW)->Conv->Transpose(NCHW->NHWC) "
        "and BN is Mul(C[C])->Add(C[C]) in NHWC after the Transpose; Keras bias is a separate NHWC Add(C[C]) for the "
        "depthwise conv; depthwise weights are computed by Reshape->Transpose of a constant (not an initializer); "
        "the bias-free Conv2D+BN was already folded by TF's grappler (Conv->Transpose->Add(C[8]))."),
    "keras3_mobilenetv2": (
        "35 Conv(group=1)+BN folded by tf2onnx; the 17 depthwise Conv(group=C, no bias)->Mul(C[1,C,1,1])->Add(C[1,C,1,1]) "
        "remain (then Clip = ReLU6). GAP->Squeeze->Gemm head."),
    "keras3_mobilenetv3small": (
        "23 Conv(group=1)+BN folded; 11 depthwise Conv(group=C, no bias)->Mul(C[1,C,1,1])->Add remain. Trap: the "
        "Rescaling layer is Mul(input, C[] scalar)->Add(C[] scalar) at the graph input (not a BN)."),
    "tfkeras_mobilenetv2": "All 52 BNs folded by tf2onnx (depthwise too): no BatchNormalization/Mul/Add-BN left.",
    "keras3_ln_last": (
        "GAP(X)=mean; Neg(mean); Sub(X,mean)=d; Mul(d,d); GAP=var; Add(var,C[] eps); Sqrt; Reciprocal; "
        "Mul(r, gamma C[1,1,32])=g; Mul(X,g); Mul(Neg(mean),g)->Add(., beta C[1,1,32]); Add(Mul(X,g), that). "
        "op18: ReduceMean(axes input C[1]=[-1], keepdims=1)."),
    "keras3_ln_nocenter": "As keras3_ln_last without Add(beta): Add(Mul(X,g), Mul(Neg(mean),g)).",
    "keras3_ln_noscale": "As keras3_ln_last without Mul(gamma): g is the Reciprocal output itself.",
    "keras3_ln_plain": "No gamma, no beta: Add(Mul(X,r), Mul(Neg(mean),r)).",
    "keras3_ln_2axes": (
        "axis=[-2,-1]: ReduceMean attribute axes=[1,2] at op13/17 (not GAP), axes input C[2]=[-2,-1] at op18; "
        "gamma/beta C[1,16,32]."),
    "tfkeras_ln_fused": (
        "tf_keras fused path: Reshape(X->[1,N*T,D,1]); ReduceMean(axes [0,2,3]); Sub; ReduceSumSquare; Shape/Gather/"
        "ReduceProd/Cast/Div for the variance; BatchNormalization(x, ones C[32], zeros C[32], computed mean, computed "
        "var, eps 1e-3); Reshape back; Mul(gamma C[32])->Add(beta C[32]). Trap: BatchNormalization with non-constant "
        "mean/var."),
    "tfkeras_ln_nonfused": (
        "tf_keras non-fused (eps 1e-6): GAP=mean; Sub; Mul(d,d); GAP=var; Add(eps); Sqrt; Reciprocal; Mul(r, gamma C[32])=g; "
        "Mul(X,g); Sub(beta C[32], Mul(mean,g)); Add. No Neg."),
    "keras3_transformer_block": (
        "MultiHeadAttention (EinsumDense -> MatMul/Reshape/Transpose, scalar Mul(C[]) before Softmax) then two Keras 3 "
        "LayerNorms (eps 1e-6) in the keras3_ln_last spelling on Add(residual) outputs."),
    "tfkeras_transformer_block": "Two tf_keras non-fused LayerNorms (eps 1e-6), spelled as in tfkeras_ln_nonfused.",
    "keras3_conv_ln_c": (
        "LN over channels after Conv: ReduceMean attribute axes=[1] (NCHW), keepdims; mean goes through "
        "Reshape([1,1,16,16]) (a folded Transpose) before Sub; eps C[1,1,1,1]; gamma/beta C[1,8,1,1]; no Transposes "
        "around the LN."),
    "keras3_conv_ln_hwc": (
        "LN over H,W,C after Conv: ReduceMean axes=[2,3,1] (unsorted; attribute at op13/17, input C[3] at op18) in "
        "NCHW; Reshape([1,1,1,1]) on mean/Neg/Reciprocal; gamma/beta C[1,16,16,8] applied in NHWC: Mul(Transpose(X "
        "NCHW->NHWC), g), so the Mul(X,.) operand is a Transpose of the ReduceMean input."),
    "keras3_rmsnorm": (
        "keras.layers.RMSNormalization: Mul(X,X); GAP (ReduceMean axes input [-1] at op18); Add(C[] eps 1e-6); "
        "Sqrt; Reciprocal; Mul(X, r); Mul(., gamma C[32]) - gamma applied after Mul(X, r), not folded into r."),
    "keras3_rmsnorm_hand": (
        "Hand-written x*rsqrt(mean(x^2)+eps)*gamma: same graph as keras3_rmsnorm (Mul(X,X), GAP, Add, Sqrt, "
        "Reciprocal, Mul(X,r), Mul(gamma C[32]))."),
    "keras3_groupnorm": (
        "Conv->Transpose(NCHW->NHWC)->Reshape([-1,16,16,4,4]); Keras 3 LN chain over ReduceMean axes=[1,2,4] "
        "(attribute op13/17, input C[3] op18); gamma/beta C[1,1,1,4,4]; Reshape([1,16,16,16]) back; Relu; "
        "Transpose->Conv."),
    "tfkeras_groupnorm": (
        "tf_keras GroupNormalization: Reshape([-1,16,16,4,4]); ReduceSum(axes input [1,2,4]) then Div(C[1,1,1,4,1] "
        "counts) with Equal/Where (div_no_nan) for mean and variance; Sub; Mul(d,d); Add(eps); Sqrt; Reciprocal; "
        "Mul(gamma C[1,1,1,4,4]); Mul(X,g); Sub(beta, Mul(mean,g)); Add; Reshape back."),
    "keras3_bn_stack_fp16": (
        "mixed_float16: input Cast(f16); fp16 Conv weights; every BN is Cast(f32)->Mul(C f32 [1,C,1,1])->Add->Cast(f16) "
        "(9 of them, including the one after the bias-free Conv, which is no longer folded); Dense is MatMul->Add(bias f16), "
        "not Gemm; output is float16."),
    "keras3_ln_last_fp16": (
        "mixed_float16: Dense in fp16, Cast(f32) before the LN, whole LN chain in float32 with f32 gamma/beta, "
        "Cast(f16) after; output float16."),
}
for _s in SPECS:
    if _s["name"] in NOTES:
        _s["notes"] = NOTES[_s["name"]]


def _set_policy(K, name):
    K.mixed_precision.set_global_policy(name)


def _policy(spec):
    return spec.get("policy") or ("mixed_float16" if spec.get("mixed") else None)


FEED_BATCH = 2  # the batch fed for a dynamic (None) batch dimension


def input_specs(inputs):
    """Normalize a builder's inputs to {name: dict(shape, dtype[, low, high])}; a None dim is dynamic."""
    out = {}
    for name, v in inputs.items():
        out[name] = dict(v) if isinstance(v, dict) else dict(shape=tuple(v), dtype="float32")
    return out


def build_model(spec):
    K = spec["K"]
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(spec["name"])) % (2 ** 31)
    K.backend.clear_session()
    policy = _policy(spec)
    if policy:
        _set_policy(K, policy)
    try:
        if K is keras:
            keras.utils.set_random_seed(seed)
        else:
            tf_keras.utils.set_random_seed(seed)
        model, inputs = spec["build"](K)
    finally:
        if policy:
            _set_policy(K, "float32")
    randomize(model, seed + 1, deep=spec.get("deep", False))
    return model, input_specs(inputs), seed


def op_histogram(mp):
    c = collections.Counter(n.op_type for n in mp.graph.node)
    return dict(sorted(c.items()))


def _signature(inputs, as_dict):
    sig = {name: tf.TensorSpec(v["shape"], tf.as_dtype(v["dtype"]), name=name) for name, v in inputs.items()}
    # (a "feed" entry of an input is the concrete shape fed for its dynamic dims)
    return [sig] if as_dict else list(sig.values())


def convert(model, inputs, opset, optimizers=None, exporter="tf2onnx", as_dict=False, path=None):
    sig = _signature(inputs, as_dict)
    if exporter == "keras_export":  # Keras 3's own Model.export (tf2onnx.convert.from_function inside)
        model.export(path, format="onnx", input_signature=sig, opset_version=opset, verbose=False)
        return onnx.load(path)
    kwargs = dict(input_signature=tuple(sig), opset=opset, custom_op_handlers={"Erfc": (_erfc_handler, [])})
    if optimizers is not None:
        kwargs["optimizers"] = optimizers
    mp, _ = tf2onnx.convert.from_keras(model, **kwargs)
    return mp


def run_ort(path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds), [o.name for o in sess.get_outputs()]


def _dtype_of(mp):
    types = set()
    for init in mp.graph.initializer:
        types.add(onnx.TensorProto.DataType.Name(init.data_type))
    out_types = {o.type.tensor_type.elem_type for o in mp.graph.output}
    if "FLOAT16" in types and "FLOAT" not in types and onnx.TensorProto.FLOAT16 in out_types:
        return "float16"
    if "FLOAT16" in types:
        return "mixed_float16"
    return "float32"


def make_feeds(inputs, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, v in inputs.items():
        shape = tuple(v.get("feed") or (FEED_BATCH if d is None else d for d in v["shape"]))
        if "low" in v:
            feeds[name] = rng.integers(v["low"], v["high"], size=shape).astype(v["dtype"])
        else:
            feeds[name] = rng.normal(0, 1, shape).astype(v["dtype"])
    return feeds


def _pair_diff(outs, names, ref):
    """Max abs diff of ORT outputs vs the Keras outputs: by name for dict outputs whose keys are the
    ONNX names, else in flattened (sorted-key) order, falling back to the first unused equal shape."""
    if isinstance(ref, dict) and all(n in ref for n in names):
        ref = [ref[n] for n in names]
    else:
        ref = tf.nest.flatten(ref)
    ref = [np.asarray(r, dtype=np.float32) for r in ref]
    used, diff = set(), 0.0
    for i, o in enumerate(outs):
        o = np.asarray(o, np.float32)
        j = i if i < len(ref) and i not in used and ref[i].shape == o.shape else next(
            (k for k, r in enumerate(ref) if k not in used and r.shape == o.shape), None)
        if j is None:
            raise RuntimeError(f"no Keras output of shape {o.shape} for ONNX output {names[i]}")
        used.add(j)
        diff = max(diff, float(np.max(np.abs(o - ref[j]))))
    return diff


def _erfc_handler(ctx, node, name, args):
    """TF's Erfc (the exact GELU of TF 2.21) has no tf2onnx 1.17 handler: write 1 - Erf(x)."""
    from tf2onnx import utils
    node.type = "Erf"
    dt = onnx.helper.tensor_dtype_to_np_dtype(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(node.name + "_one"), np.array(1, dtype=dt))
    sub = ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(node.name + "_erfc"))
    ctx.replace_inputs(sub, [one.output[0], node.output[0]])
    return node


def export_spec(spec):
    entries = []
    model, inputs, seed = build_model(spec)
    as_dict = isinstance(model.input, dict) if hasattr(model, "input") else False
    feeds = make_feeds(inputs, seed + 2)
    xs = [feeds[k] for k in inputs]
    ref = model(dict(feeds) if as_dict else (xs[0] if len(xs) == 1 else xs), training=False)
    gt = ground_truth(model)
    Kname = "keras" if spec["K"] is keras else "tf_keras"
    builder = spec["build"].__name__
    source = spec.get("source") or (SRC if spec["K"] is keras else SRC2).format(builder)
    policy = _policy(spec)
    if policy:
        source += f" under {policy} global policy"
    exporter = spec.get("exporter", "tf2onnx")
    pipeline = ("Keras Model.export(format='onnx')" if exporter == "keras_export"
                else "tf2onnx optimizers off (optimizers={})" if spec.get("optimizers") == {}
                else "tf2onnx default pipeline")
    for opset in spec["opsets"]:
        fname = f"{spec['name']}_op{opset}.onnx"
        path = os.path.join(HERE, fname)
        entry = dict(file=fname, source=source, exporter=exporter, pipeline=pipeline, keras_package=Kname,
                     opset=opset)
        try:
            mp = convert(model, inputs, opset, spec.get("optimizers"), exporter, as_dict, path)
            onnx.checker.check_model(mp)
            onnx.save(mp, path)
            onnx_inputs = [i.name for i in mp.graph.input]
            ofeeds = {gi.name: feeds[gi.name] for gi in mp.graph.input}
            outs, names = run_ort(path, ofeeds)
            diff = _pair_diff(outs, names, ref)
            ins = {}
            for n in onnx_inputs:
                v = inputs[n]
                ins[n] = {"shape": list(v.get("feed") or (FEED_BATCH if d is None else d for d in v["shape"])),
                          "dtype": v["dtype"]}
                if "low" in v:
                    ins[n].update(low=v["low"], high=v["high"])
            entry.update(
                dtype=_dtype_of(mp),
                inputs=ins,
                outputs={o.name: {"shape": [d.dim_value if d.HasField("dim_value") else d.dim_param
                                            for d in o.type.tensor_type.shape.dim],
                                  "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                                      o.type.tensor_type.elem_type).name}
                         for o in mp.graph.output},
                ground_truth=gt,
                observed_ops=op_histogram(mp),
                ort_vs_keras_max_abs_diff=diff,
                seed=seed,
                notes=spec.get("notes", ""),
            )
            dyn = {n: {str(i): "batch" if i == 0 else f"dim{i}" for i, d in enumerate(inputs[n]["shape"]) if d is None}
                   for n in onnx_inputs}
            dyn = {n: v for n, v in dyn.items() if v}
            if dyn:
                entry["dynamic_axes"] = dyn
            if spec.get("expected"):
                entry["expected"] = spec["expected"]
            print(f"  {fname}: {os.path.getsize(path)} B, diff={diff:.3g}, gt={gt}", flush=True)
        except Exception as exc:  # record failure, keep going
            traceback.print_exc()
            entry.update(failed=f"{type(exc).__name__}: {exc}"[:2000])
            if os.path.exists(path):
                os.remove(path)
            print(f"  {fname}: FAILED {exc}", flush=True)
        entries.append(entry)
    return entries


def main(argv):
    filters = argv[1:]
    old = {}
    if os.path.exists(MANIFEST):
        with open(MANIFEST) as f:
            old = {e["file"]: e for e in json.load(f)["models"]}
    entries = dict(old) if filters else {}
    for spec in SPECS:
        if filters and not any(spec["name"] == f[1:] if f.startswith("=") else f in spec["name"] for f in filters):
            continue
        print(spec["name"], flush=True)
        try:
            spec_entries = export_spec(spec)
        except Exception as exc:  # the builder itself failed: record it for every opset, keep going
            traceback.print_exc()
            spec_entries = [dict(file=f"{spec['name']}_op{o}.onnx", failed=f"{type(exc).__name__}: {exc}"[:2000])
                            for o in spec["opsets"]]
        for e in spec_entries:
            if "expected" in old.get(e["file"], {}) and "failed" not in e:
                e["expected"] = old[e["file"]]["expected"]  # owned by tests/test_corpus.py's maintainers
            entries[e["file"]] = e
    order = [f"{s['name']}_op{o}.onnx" for s in SPECS for o in s["opsets"]]
    models = [entries[f] for f in order if f in entries]
    manifest = {
        "generator": "models/tf/export_tf.py",
        "tensorflow": tf.__version__,
        "tf2onnx": tf2onnx.__version__,
        "keras": keras.__version__,
        "tf_keras": tf_keras.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "comparison": "onnxruntime CPU with ORT_DISABLE_ALL vs Keras model(x, training=False)",
        "ground_truth_definition": (
            "counts of Keras layers by class over model.layers (nested models included); "
            "batchnorm_after_linear = BatchNormalization layers whose single input is the output of a "
            "Conv*/DepthwiseConv/SeparableConv/Conv*Transpose/Dense layer with linear activation and "
            "no other consumer; batchnorm_before_linear = the other BatchNormalization layers whose output "
            "only a Dense (on [N, C]) or an unpadded Conv reads (none in these models) "
            "(RMSNormalization, keras_hub's Gemma RMSNormalization and LlamaLayerNorm and the hand-written "
            "HandRMSNorm count as rmsnorm); keras_hub backbones are walked into their blocks' sublayers "
            "(layer._flatten_layers). 'expected' (where present) is what normfold reaches today where it is "
            "short of the ground truth (set by models/misses.py --update-expected; see tests/test_corpus.py)"),
        "models": models,
    }
    with open(MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    failed = [m["file"] for m in models if "failed" in m]
    print(f"wrote {len(models)} entries, {len(failed)} failed: {failed}")


if __name__ == "__main__":
    main(sys.argv)
