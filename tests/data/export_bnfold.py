"""Export the small real models tests/test_prepare.py and tests/test_batchnorm.py read.

    pip install torch==2.13.0 onnxscript==0.7.2 && python tests/data/export_bnfold.py

Each is a PyTorch module in eval mode with randomized BatchNorm statistics, exported as the
exporter writes it (the dynamo exports' weights are then moved inline, nothing else changes):
- torch_bn_ir3_op7.onnx: TorchScript at opset 7 writes IR version 3, which lists every
  initializer as a graph input (Conv -> BN -> Relu -> mean -> Linear -> BatchNorm1d).
- torch_levit_linear_bn_op13.onnx: LeViT's Linear_BN, `bn(linear(x).flatten(0, 1)).reshape_as(x)`:
  TorchScript writes MatMul -> Flatten -> BatchNormalization -> Reshape(., Shape(MatMul output)).
- torch_levit_linear_bn_dynamo_noopt_op18.onnx: the same through the dynamo exporter, optimize=False.
- torch_bn_dropout_linear_dynamo_noopt_op18.onnx: Relu -> BatchNorm1d -> Dropout -> Linear through
  the dynamo exporter, optimize=False, which keeps the eval-mode Dropout as an Identity.
"""

from pathlib import Path

import onnx
import torch
from torch import nn

HERE = Path(__file__).parent


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.l, self.bn1 = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn1(self.l(torch.relu(self.bn(self.c(x))).mean((2, 3))))


class LinearBN(nn.Module):
    def __init__(self, a=8, b=16):
        super().__init__()
        self.c, self.bn = nn.Linear(a, b, bias=False), nn.BatchNorm1d(b)

    def forward(self, x):
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.drop, self.l = nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 4)

    def forward(self, x):
        return self.l(self.drop(self.bn(torch.relu(x))))


def ready(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def dynamo_export(model, args, name):
    path = HERE / name
    torch.onnx.export(model, args, path, dynamo=True, optimize=False, input_names=["x"])
    onnx.save(onnx.load(path), path)  # weights inline: one small file per model
    Path(f"{path}.data").unlink(missing_ok=True)


def main():
    preserve = dict(dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"])
    torch.onnx.export(ready(ConvNet()), (torch.randn(2, 3, 8, 8),), HERE / "torch_bn_ir3_op7.onnx",
                      opset_version=7, **preserve)
    torch.onnx.export(ready(LinearBN()), (torch.randn(2, 5, 8),), HERE / "torch_levit_linear_bn_op13.onnx",
                      opset_version=13, **preserve)
    dynamo_export(ready(LinearBN()), (torch.randn(2, 5, 8),), "torch_levit_linear_bn_dynamo_noopt_op18.onnx")
    dynamo_export(ready(Head()), (torch.randn(3, 8),), "torch_bn_dropout_linear_dynamo_noopt_op18.onnx")


if __name__ == "__main__":
    main()
