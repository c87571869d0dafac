#!/usr/bin/env python3
"""Generate the real-network benchmark models (no downloads, nothing committed but this script).

Usage (from the repository root; needs numpy, onnx and onnxruntime, the versions pinned in
tests/fixtures/requirements.txt):

    python3 benches/models/generate.py [--out target/bench-models] [--models squeezenet,resnet50,textdir]

Writes, per model, `OUT/<name>/model.onnx` and `OUT/<name>/golden/000.json` (one input of
fixed-seed noise and onnxruntime's outputs for it, the format `capsule build --golden`
reads). A model already present with the same script hash is kept.

Models (torchvision's layer for layer, fixed-seed He-normal weights, batch normalization
folded into the convolutions the way `torch.onnx.export` does in eval mode, dropout
removed, batch dimension symbolic as `dynamic_axes` leaves it):

    squeezenet   SqueezeNet 1.1, 1x3x224x224 -> 1000 logits (1.24 M parameters, 4.9 MB)
    resnet50     ResNet-50 (bottleneck v1.5: stride on the 3x3), 1x3x224x224 -> 1000
                 logits (25.5 M parameters, 102 MB)
    textdir      a small text-direction classifier of the kind OCR pipelines run per text
                 line (PaddleOCR's angle classifier's size class): 1x3x48x192 -> 2 logits,
                 four stages of two 3x3 conv-relu and a 2x2 max pool, 0.3 M parameters

The weights are random, so the outputs mean nothing; what matters for a runtime benchmark is
the graph: its operators, shapes and arithmetic are those of the real networks.
"""

import argparse
import hashlib
import json
import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Graph:
    """A tiny builder: nodes, initializers and fresh names."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, prefix):
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, prefix, array):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x, cin, cout, k, stride=1, pad=0, groups=1, scale=1.0, relu=True):
        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in) * scale
        b = self.rng.standard_normal(cout) * 0.01
        y = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.const("w", w), self.const("b", b)],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                group=groups,
            )
        )
        return self.relu(y) if relu else y

    def relu(self, x):
        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y

    def maxpool(self, x, k, stride, pad=0, ceil=0):
        y = self.name("maxpool")
        self.nodes.append(
            helper.make_node(
                "MaxPool",
                [x],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                ceil_mode=ceil,
            )
        )
        return y

    def op(self, op, inputs, **attrs):
        y = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [y], **attrs))
        return y

    def head(self, x, cin, classes):
        """Global average pool, flatten, fully connected (torchvision's classifier)."""
        x = self.op("GlobalAveragePool", [x])
        x = self.op("Flatten", [x], axis=1)
        w = self.rng.standard_normal((classes, cin)) * np.sqrt(1.0 / cin)
        b = self.rng.standard_normal(classes) * 0.01
        return self.op("Gemm", [x, self.const("fc_w", w), self.const("fc_b", b)], transB=1)

    def model(self, x, y, shape, out_shape, name):
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="capsule benches/models/generate.py",
        )
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def squeezenet():
    """torchvision.models.squeezenet1_1, eval mode."""
    g = Graph(seed=11)
    x = g.conv("input", 3, 64, 3, stride=2)
    x = g.maxpool(x, 3, 2, ceil=1)

    def fire(x, cin, squeeze, e1, e3):
        s = g.conv(x, cin, squeeze, 1)
        a = g.conv(s, squeeze, e1, 1)
        b = g.conv(s, squeeze, e3, 3, pad=1)
        return g.op("Concat", [a, b], axis=1)

    x = fire(x, 64, 16, 64, 64)
    x = fire(x, 128, 16, 64, 64)
    x = g.maxpool(x, 3, 2, ceil=1)
    x = fire(x, 128, 32, 128, 128)
    x = fire(x, 256, 32, 128, 128)
    x = g.maxpool(x, 3, 2, ceil=1)
    x = fire(x, 256, 48, 192, 192)
    x = fire(x, 384, 48, 192, 192)
    x = fire(x, 384, 64, 256, 256)
    x = fire(x, 512, 64, 256, 256)
    # classifier: Dropout (identity in eval), 1x1 conv to 1000 classes, ReLU, global pool.
    x = g.conv(x, 512, 1000, 1)
    x = g.op("GlobalAveragePool", [x])
    y = g.op("Flatten", [x], axis=1)
    return g.model("input", y, ["batch", 3, 224, 224], ["batch", 1000], "squeezenet1_1"), (3, 224, 224)


def resnet50():
    """torchvision.models.resnet50 (v1.5), eval mode, batch norm folded."""
    g = Graph(seed=50)
    x = g.conv("input", 3, 64, 7, stride=2, pad=3)
    x = g.maxpool(x, 3, 2, pad=1)
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            s = stride if i == 0 else 1
            out = width * 4
            h = g.conv(x, cin, width, 1)
            h = g.conv(h, width, width, 3, stride=s, pad=1)
            # The residual branch's last conv is scaled down (like zero-init-residual, not
            # zero) so that 16 blocks of random weights keep activations in range.
            h = g.conv(h, width, out, 1, scale=0.2, relu=False)
            if s != 1 or cin != out:
                x = g.conv(x, cin, out, 1, stride=s, relu=False)
            x = g.relu(g.op("Add", [h, x]))
            cin = out
    y = g.head(x, 2048, 1000)
    return g.model("input", y, ["batch", 3, 224, 224], ["batch", 1000], "resnet50"), (3, 224, 224)


def textdir():
    """A small text-line direction classifier (0 or 180 degrees), 48x192 inputs."""
    g = Graph(seed=7)
    x = "input"
    cin = 3
    for cout in [16, 32, 64, 128]:
        x = g.conv(x, cin, cout, 3, pad=1)
        x = g.conv(x, cout, cout, 3, pad=1)
        x = g.maxpool(x, 2, 2)
        cin = cout
    y = g.head(x, cin, 2)
    return g.model("input", y, ["batch", 3, 48, 192], ["batch", 2], "textdir"), (3, 48, 192)


MODELS = {"squeezenet": squeezenet, "resnet50": resnet50, "textdir": textdir}


def golden(model_path, chw, tolerance):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, *chw)).astype(np.float32)
    (y,) = sess.run(None, {"input": x})
    if not np.all(np.isfinite(y)):
        sys.exit(f"{model_path}: non-finite outputs")
    tensor = lambda name, a: {
        "name": name,
        "datatype": "FP32",
        "shape": list(a.shape),
        "data": [float(v) for v in a.reshape(-1)],
    }
    return {"inputs": [tensor("input", x)], "outputs": [tensor(sess.get_outputs()[0].name, y)], "tolerance": tolerance}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="target/bench-models")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="golden tolerance, relative to max(1, |expected|) (capsule's rule)")
    args = p.parse_args()
    with open(__file__, "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()
    for name in args.models.split(","):
        if name not in MODELS:
            sys.exit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        out = os.path.join(args.out, name)
        stamp_file = os.path.join(out, "generated-by")
        if os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
            print(f"{name}: up to date in {out}")
            continue
        model, chw = MODELS[name]()
        os.makedirs(os.path.join(out, "golden"), exist_ok=True)
        path = os.path.join(out, "model.onnx")
        onnx.save(model, path)
        with open(os.path.join(out, "golden", "000.json"), "w") as f:
            json.dump(golden(path, chw, args.tolerance), f)
        with open(stamp_file, "w") as f:
            f.write(stamp)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(f"{name}: {params / 1e6:.2f} M parameters, {os.path.getsize(path) / 1e6:.1f} MB -> {out}")


if __name__ == "__main__":
    main()
