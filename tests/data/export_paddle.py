"""Export the small PaddlePaddle model tests/test_channel_affine.py reads.

    pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 && python tests/data/export_paddle.py

- paddle_bn_prim_op17.onnx: Conv -> BatchNorm2D -> ReLU -> MaxPool -> BatchNorm2D -> ReLU ->
  BatchNorm2D -> Conv 1x1, in eval mode with randomized statistics, through paddle2onnx with
  `dist_prim_all=True` (Paddle decomposes batch_norm into primitives first). Every BN becomes
  `Sub(C[C,1,1]) -> Mul(C) -> Mul(C) -> Add(C)`, and paddle2onnx writes an Identity after every op,
  so an Identity stands between each two of the chain's ops.
"""

from pathlib import Path

import numpy as np
import paddle
import paddle2onnx
from paddle import nn

HERE = Path(__file__).parent


class PreactNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.b2, self.b3 = nn.BatchNorm2D(8), nn.BatchNorm2D(8)
        self.c2 = nn.Conv2D(8, 4, 1)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.b1(self.c1(x))), 2)
        return self.c2(self.b3(nn.functional.relu(self.b2(x))))


def main():
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = PreactNet()
    for bn in (model.b1, model.b2, model.b3):
        bn._mean.set_value(rng.normal(0, 0.5, 8).astype("float32"))
        bn._variance.set_value(rng.uniform(0.3, 2.0, 8).astype("float32"))
        bn.weight.set_value(rng.normal(1, 0.3, 8).astype("float32"))
        bn.bias.set_value(rng.normal(0, 0.3, 8).astype("float32"))
    model.eval()
    prefix = str(HERE / "paddle_tmp" / "m")
    paddle.jit.save(model, prefix, input_spec=[paddle.static.InputSpec([1, 3, 8, 8], "float32", "x")])
    paddle2onnx.export(prefix + ".json", prefix + ".pdiparams", str(HERE / "paddle_bn_prim_op17.onnx"),
                       opset_version=17, dist_prim_all=True)
    for f in sorted((HERE / "paddle_tmp").iterdir()):
        f.unlink()
    (HERE / "paddle_tmp").rmdir()


if __name__ == "__main__":
    main()
