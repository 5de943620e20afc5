"""A mobilenet-like CNN whose BatchNorm statistics are measured on its own activations.

With random statistics (as most test models have) a BN barely changes magnitudes and folding it
changes float32 rounding very little. Real networks are different: every BN normalizes what really
reaches it, some channels have tiny variance (so the folded weights are scaled up a lot), and
rounding differences grow through depth. This builder reproduces that: blocks of expand 1x1 Conv,
depthwise 3x3 Conv and projection 1x1 Conv, each followed by BN, with squeeze-excite and
residuals, ~25 BN in all; each BN's mean and variance are measured by running the network built so
far on a calibration batch, then perturbed (as training leaves them: close, not exact); the
classifier's outputs reach ~100.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int, size: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.size = size
        self.calib = self.rng.standard_normal((4, 3, size, size)).astype(np.float32)

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def const(self, value: np.ndarray, kind: str = "c") -> str:
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    def model(self, output: str, classes: int | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "deep_cnn",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, self.size, self.size])],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, classes] if classes else None)],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    def activations(self, tensor: str) -> np.ndarray:
        """Run the network built so far on the calibration batch (one image at a time: the model's
        batch is 1) and return `tensor`."""
        session = ort.InferenceSession(self.model(tensor).SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"x": image[None]})[0] for image in self.calib])

    def conv(self, x: str, cin: int, cout: int, kernel: int = 1, stride: int = 1, group: int = 1,
             bias: bool = False) -> str:
        fan_in = cin // group * kernel * kernel
        w = (self.rng.standard_normal((cout, cin // group, kernel, kernel)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        pad = kernel // 2
        return self.node("Conv", inputs, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4, group=group)

    def bn(self, x: str, channels: int) -> str:
        """BatchNormalization with statistics measured on `x`, then perturbed."""
        a = self.activations(x).astype(np.float64)
        mean = a.mean(axis=(0, 2, 3))
        var = a.var(axis=(0, 2, 3))
        std = np.sqrt(var + 1e-12)
        mean = mean + 0.05 * std * self.rng.standard_normal(channels)
        var = var * np.exp(0.1 * self.rng.standard_normal(channels)) + 1e-6
        gamma = np.abs(1.0 + 0.3 * self.rng.standard_normal(channels))
        beta = 0.2 * self.rng.standard_normal(channels)
        params = [self.const(v.astype(np.float32), k) for v, k in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"),
                                                                   (var, "var"))]
        return self.node("BatchNormalization", [x, *params], epsilon=1e-5)

    def relu6(self, x: str) -> str:
        return self.node("Clip", [x, self.const(np.array(0.0, np.float32)), self.const(np.array(6.0, np.float32))])

    def se(self, x: str, channels: int) -> str:
        squeezed = self.node("GlobalAveragePool", [x])
        hidden = self.node("Relu", [self.conv(squeezed, channels, max(4, channels // 4), bias=True)])
        gate = self.node("HardSigmoid", [self.conv(hidden, max(4, channels // 4), channels, bias=True)],
                         alpha=1.0 / 6, beta=0.5)
        return self.node("Mul", [x, gate])


def deep_cnn(seed: int = 0, size: int = 32, blocks=((16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1),
                                                    (32, 48, 2), (48, 48, 1), (48, 64, 1), (64, 64, 1)),
             classes: int = 100, logit_scale: float = 60.0) -> onnx.ModelProto:
    """The model (opset 13, input x [1, 3, size, size], output [1, classes]); 3 BN per block plus
    the stem's and the head's: 26 BN with the default blocks."""
    b = _Builder(seed, size)
    x = b.relu6(b.bn(b.conv("x", 3, 16, 3, stride=2), 16))
    for cin, cout, stride in blocks:
        wide = cin * 4
        h = b.relu6(b.bn(b.conv(x, cin, wide), wide))
        h = b.relu6(b.bn(b.conv(h, wide, wide, 3, stride=stride, group=wide), wide))
        h = b.se(h, wide)
        h = b.bn(b.conv(h, wide, cout), cout)
        x = b.node("Add", [x, h]) if cin == cout and stride == 1 else h
    head = blocks[-1][1] * 4
    x = b.relu6(b.bn(b.conv(x, blocks[-1][1], head), head))
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    w = (b.rng.standard_normal((classes, head)) * logit_scale / np.sqrt(head)).astype(np.float32)
    logits = b.node("Gemm", [pooled, b.const(w, "fc_w"), b.const(np.zeros(classes, np.float32), "fc_b")], transB=1)
    model = b.model(logits, classes)
    onnx.checker.check_model(model, full_check=True)
    return model
