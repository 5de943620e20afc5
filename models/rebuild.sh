#!/usr/bin/env bash
# Rebuild the whole sample-model corpus from scratch: models/torch (PyTorch 2.13 + transformers,
# TorchScript and dynamo exporters) and models/tf (Keras 3 / tf_keras / keras_hub through tf2onnx 1.17
# and Keras' own Model.export), each
# with its manifest.json. Each framework gets its own virtualenv (they pin different protobufs).
# Usage: bash models/rebuild.sh [torch|tf]   (default: both). Needs network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${NORMFOLD_VENVS:-.venvs}
which=${1:-both}

if [[ $which == torch || $which == both ]]; then
  python3 -m venv "$VENVS/torch"
  "$VENVS/torch/bin/pip" install -q torch==2.13.0
  "$VENVS/torch/bin/pip" install -q transformers onnx onnxruntime onnxscript
  "$VENVS/torch/bin/python" models/torch/export_torch.py
fi
if [[ $which == tf || $which == both ]]; then
  python3 -m venv "$VENVS/tf"
  "$VENVS/tf/bin/pip" install -q "tensorflow-cpu==2.21.*" "tf2onnx==1.17.*" "tf_keras==2.21.*" keras-hub onnx onnxruntime
  "$VENVS/tf/bin/python" models/tf/export_tf.py
fi
