#!/usr/bin/env bash
# Rebuild the whole sample-model corpus from scratch: models/torch (PyTorch 2.13 + transformers,
# TorchScript and dynamo exporters) and models/tf (Keras 3 / tf_keras / keras_hub through tf2onnx 1.17
# and Keras' own Model.export) and models/paddle (PaddlePaddle 3.3.1 through paddle2onnx 2.1.0), each
# with its manifest.json. Each framework gets its own virtualenv (they pin different protobufs).
# Usage: bash models/rebuild.sh [torch|tf|paddle]   (default: all three). Needs network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${NORMFOLD_VENVS:-.venvs}
which=${1:-all}

if [[ $which == torch || $which == all ]]; then
  python3 -m venv "$VENVS/torch"
  "$VENVS/torch/bin/pip" install -q torch==2.13.0
  "$VENVS/torch/bin/pip" install -q transformers onnx onnxruntime onnxscript
  "$VENVS/torch/bin/python" models/torch/export_torch.py
fi
if [[ $which == tf || $which == all ]]; then
  python3 -m venv "$VENVS/tf"
  "$VENVS/tf/bin/pip" install -q "tensorflow-cpu==2.21.*" "tf2onnx==1.17.*" "tf_keras==2.21.*" keras-hub onnx onnxruntime
  "$VENVS/tf/bin/python" models/tf/export_tf.py
fi
if [[ $which == paddle || $which == all ]]; then
  python3 -m venv "$VENVS/paddle"
  # paddle2onnx 2.1.0 pins onnx<=1.17; its constant folding (polygraphy) needs onnx_graphsurgeon and sympy
  "$VENVS/paddle/bin/pip" install -q paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx_graphsurgeon sympy onnxruntime
  "$VENVS/paddle/bin/python" models/paddle/export_paddle.py
fi
