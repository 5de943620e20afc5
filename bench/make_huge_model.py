#!/usr/bin/env python
"""Build a model over protobuf's 2 GB limit, with external data, for `normfold fold` on models
that cannot be one file: 240 x Conv(3x3, 512 channels) -> BatchNormalization -> Relu, 2.27 GB of
weights in <out>/huge.onnx.data. Written outside the repository (default /work/bench-data/huge).

    python bench/make_huge_model.py [OUT_DIR]
    normfold fold OUT_DIR/huge.onnx -o OUT_DIR/out/folded.onnx --report OUT_DIR/out/report.json

Weights are He-scaled and BN statistics near 1, so 240 layers stay well conditioned and the
folded model can be verified against the original.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

CHANNELS, LAYERS = 512, 240


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/bench-data/huge")
    if (Path(__file__).resolve().parents[1] / "normfold").exists() and Path(__file__).resolve().parents[1] in out.resolve().parents:
        sys.exit("refusing to write a 2 GB model inside the repository")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("huge.onnx", "huge.onnx.data"):
        (out / name).unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = rng.standard_normal((CHANNELS, CHANNELS, 3, 3), dtype=np.float32) * np.float32((2.0 / (CHANNELS * 9)) ** 0.5)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        for n, v in (("s", rng.random(CHANNELS) + .5), ("b", rng.standard_normal(CHANNELS)),
                     ("m", rng.standard_normal(CHANNELS) * .1), ("v", rng.random(CHANNELS) + .5)):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{n}{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"t{i}"]),
                  helper.make_node("Relu", [f"t{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", 1, [1, CHANNELS, 4, 4])],
                              [helper.make_tensor_value_info(x, 1, [1, CHANNELS, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, out / "huge.onnx", save_as_external_data=True, location="huge.onnx.data")
    print(f"wrote {out / 'huge.onnx'} and {(out / 'huge.onnx.data').stat().st_size / 2**30:.2f} GiB of external data")


if __name__ == "__main__":
    main()
