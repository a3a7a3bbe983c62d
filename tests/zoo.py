"""Small models with the traits of real exported models, built here so no weights are ever downloaded.

Each builder writes an ONNX file and returns its path. The PyTorch ones use the legacy (TorchScript) exporter,
which writes one self-contained file at the requested opset (shared/FACTS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def export(model: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
           dynamic_axes: dict | None = None, opset: int = 17) -> Path:
    model.eval()
    torch.onnx.export(model, args, str(path), input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return path


# ---------------------------------------------------------------- MobileNet-like


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand → 3x3 depthwise (stride 1 or 2) → 1x1 project, residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int | None = None, *, stride: int = 1, expand: int = 4):
        super().__init__()
        c_out = c_out or c_in
        h = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.body = nn.Sequential(
            nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride=stride, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetLike(nn.Module):
    """conv + depthwise conv + BN + ReLU6 + residual add + global pool + Gemm, downsampling like MobileNetV2
    (stride-2 depthwise inside an inverted residual)."""

    def __init__(self, width: int = 32, blocks: int = 3, classes: int = 10, grouped_downsample: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU6()]
        c = width
        for i in range(blocks):
            layers.append(InvertedResidual(c))
            if i < blocks - 1:
                if grouped_downsample:  # grouped conv, 2 outputs per input channel: no fast INT8 kernel on CPU
                    layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1, groups=c, bias=False),
                               nn.BatchNorm2d(c * 2), nn.ReLU6()]
                else:
                    layers.append(InvertedResidual(c, c * 2, stride=2))
                c *= 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.mean(dim=(2, 3)))


def _settle_bn(model: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    """Give BatchNorm realistic running statistics (random init leaves mean 0 / var 1)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(8):
            model(torch.randn(8, *shape[1:], generator=g))
    model.eval()


def mobilenet_like(path: Path, *, size: int = 64, width: int = 32, blocks: int = 3, seed: int = 0,
                   dynamic_batch: bool = False, opset: int = 17, grouped_downsample: bool = False) -> Path:
    torch.manual_seed(seed)
    m = MobileNetLike(width=width, blocks=blocks, grouped_downsample=grouped_downsample)
    _settle_bn(m, (1, 3, size, size), seed)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    return export(m, (torch.randn(1, 3, size, size),), path, input_names=["input"], output_names=["logits"],
                  dynamic_axes=axes, opset=opset)


# ---------------------------------------------------------------- transformer block


class EncoderBlock(nn.Module):
    """MatMul, LayerNorm, Softmax, GELU, written out so the exporter emits plain ops."""

    def __init__(self, d: int = 64, heads: int = 4, classes: int = 8):
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        x = x + self.ff(self.ln2(x))
        return self.head(x.mean(dim=1))


def transformer_block(path: Path, *, tokens: int = 16, d: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return export(EncoderBlock(d=d), (torch.randn(1, tokens, d),), path, input_names=["tokens"],
                  output_names=["logits"])


def outlier_encoder(path: Path, *, width: int = 64, tokens: int = 16, outlier: float = 20.0, seed: int = 0) -> Path:
    """Two post-norm blocks (LayerNorm → MatMul → Add → Relu → MatMul → + the LayerNorm's output) and a head, whose
    LayerNorm scales carry two channels ``outlier``× the others, as trained transformers' do (all-MiniLM-L6-v2:
    18-20× after every attention block). The weights reading those channels are small, so the output depends on
    the ordinary channels that one INT8 scale per tensor rounds away."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def weight(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    x = "x"
    for b in range(2):
        gamma = np.ones(width)
        gamma[[3, 17]] = outlier
        w1 = rng.normal(0, 1 / np.sqrt(width), (width, 2 * width))
        w1[[3, 17]] *= 0.05
        nodes += [
            helper.make_node("LayerNormalization", [x, weight(f"gamma{b}", gamma),
                                                    weight(f"beta{b}", rng.normal(0, 0.1, width))], [f"ln{b}"],
                             name=f"ln{b}", axis=-1),
            helper.make_node("MatMul", [f"ln{b}", weight(f"w1_{b}", w1)], [f"h{b}"], name=f"fc1_{b}"),
            helper.make_node("Add", [f"h{b}", weight(f"b1_{b}", rng.normal(0, 0.05, 2 * width))], [f"hb{b}"],
                             name=f"bias1_{b}"),
            helper.make_node("Relu", [f"hb{b}"], [f"r{b}"], name=f"relu{b}"),
            helper.make_node("MatMul", [f"r{b}", weight(f"w2_{b}", rng.normal(0, 1 / np.sqrt(2 * width),
                                                                                 (2 * width, width)))],
                             [f"o{b}"], name=f"fc2_{b}"),
            helper.make_node("Add", [f"o{b}", f"ln{b}"], [f"res{b}"], name=f"residual{b}"),
        ]
        x = f"res{b}"
    head = rng.normal(0, 1 / np.sqrt(width), (width, 32))
    head[[3, 17]] *= 0.01
    nodes.append(helper.make_node("MatMul", [x, weight("head", head)], ["y"], name="head"))
    graph = helper.make_graph(nodes, "outlier_encoder",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- recurrent


class GRUClassifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 48, classes: int = 6):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def recurrent(path: Path, *, steps: int = 20, features: int = 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return export(GRUClassifier(features), (torch.randn(1, steps, features),), path,
                  input_names=["series"], output_names=["logits"])


# ---------------------------------------------------------------- two inputs, two outputs


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.meta = nn.Sequential(nn.Linear(8, 64), nn.ReLU())
        self.cls = nn.Linear(128, 5)
        self.reg = nn.Linear(128, 3)

    def forward(self, image, meta):
        z = torch.cat([self.img(image), self.meta(meta)], dim=1)
        return self.cls(z), self.reg(z)


def two_in_two_out(path: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return export(TwoInTwoOut(), (torch.randn(1, 3, 32, 32), torch.randn(1, 8)), path,
                  input_names=["image", "meta"], output_names=["class_logits", "regression"])


# ---------------------------------------------------------------- YOLO-style mixed-range head


class MixedRangeDetector(nn.Module):
    """One output concatenating box coordinates (0..640 px) and class scores (0..1), like YOLOv8's head."""

    def __init__(self, classes: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        f = self.backbone(x)
        boxes = torch.sigmoid(self.box(f)) * 640.0
        scores = torch.sigmoid(self.cls(f))
        out = torch.cat([boxes, scores], dim=1)  # [B, 4 + C, H, W]
        return out.flatten(2)  # [B, 4 + C, anchors]


def mixed_range_detector(path: Path, *, size: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    m = MixedRangeDetector()
    with torch.no_grad():  # confident-ish class scores, spread over 0..1 like a trained head
        m.cls.weight.mul_(4.0)
    return export(m, (torch.randn(1, 3, size, size),), path, input_names=["images"], output_names=["output0"])


# ---------------------------------------------------------------- recognition head with outlier features


class TinyRecognizer(nn.Module):
    """Text-line recognizer: conv features → one feature vector per character slot → GRU → per-step vocabulary
    log-probabilities [B, steps, vocab]; text accuracy is the share of lines read exactly right.

    Like many exported recognizers it carries a 'massive activation' feature channel (a large, nearly constant
    value that the head ignores). One INT8 scale for that tensor rounds every ordinary feature to zero.
    """

    def __init__(self, vocab: int = 10, hidden: int = 48, length: int = 4):
        super().__init__()
        self.length = length
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.slot = nn.Linear(16 * 4 * 4, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.register_buffer("outlier", torch.zeros(hidden))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):  # x: [B, 1, 8, 8 * length]
        f = self.conv(x)  # [B, 16, 4, 4 * length]
        b = f.shape[0]
        f = f.permute(0, 3, 1, 2).reshape(b, self.length, -1)  # [B, length, 16 * 4 * 4]: 4 columns per slot
        h, _ = self.rnn(torch.relu(self.slot(f)))
        h = h + self.outlier
        return torch.log_softmax(self.head(h), dim=-1)


def digit_strings(n: int, *, length: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images of `length` scikit-learn digits side by side: [n, 1, 8, 8*length] in 0..1, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(digits.images), size=(n, length))
    images = np.concatenate([digits.images[idx[:, i]] for i in range(length)], axis=2) / 16.0
    return images[:, None].astype(np.float32), digits.target[idx].astype(np.int64)


def train_recognizer(*, steps: int = 300, seed: int = 0, outlier: float = 2000.0) -> TinyRecognizer:
    """Train on digit strings (a few seconds), then switch on the outlier channel. The head's weights for that
    channel are held at zero throughout, so the outlier leaves the FP32 function unchanged."""
    torch.manual_seed(seed)
    model = TinyRecognizer()
    images, labels = digit_strings(4096, seed=seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.nll_loss(model(x[i]).reshape(-1, 10), y[i].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.head.weight[:, 0] = 0.0
    with torch.no_grad():
        model.outlier[0] = outlier
    return model.eval()


def read_text(logp: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(c) for c in row) for row in logp.argmax(-1)]


def recognizer(path: Path, *, seed: int = 0, outlier: float = 2000.0) -> Path:
    model = train_recognizer(seed=seed, outlier=outlier)
    return export(model, (torch.zeros(1, 1, 8, 32),), path, input_names=["image"], output_names=["logprobs"])


# ---------------------------------------------------------------- trained digits classifier (real data)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                 nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, split 70/30: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    cut = int(0.7 * len(x))
    return x[order[:cut]], d.target[order[:cut]], x[order[cut:]], d.target[order[cut:]]


def trained_digits_classifier(path: Path, *, epochs: int = 15, seed: int = 0) -> tuple[Path, float]:
    """Train a small CNN on real handwritten digits; returns the ONNX path and its FP32 test accuracy."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_data(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    export(model, (torch.zeros(1, 1, 8, 8),), path, input_names=["image"], output_names=["logits"],
           dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path, acc


# ---------------------------------------------------------------- hand-built ONNX graphs


def _weight(rng: np.random.Generator, name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)


def mlp_opset(path: Path, *, opset: int = 11, seed: int = 0) -> Path:
    """Conv + Gemm network at an old opset (< 13 cannot carry per-channel DequantizeLinear)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    inits = [_weight(rng, "w1", 16, 3, 3, 3), _weight(rng, "b1", 16), _weight(rng, "w2", 32, 16, 3, 3),
             _weight(rng, "b2", 32), _weight(rng, "w3", 10, 32), _weight(rng, "b3", 10)]
    graph = helper.make_graph(nodes, "old_opset", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                              [1, 3, 16, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def weights_in_subgraph(path: Path, *, seed: int = 0) -> Path:
    """All weights live inside the branches of an `If` (as exported control flow does): nothing to quantize."""
    rng = np.random.default_rng(seed)

    def branch(name: str, scale: float) -> onnx.GraphProto:
        w = numpy_helper.from_array((rng.standard_normal((64, 256)) * scale).astype(np.float32), f"{name}_w")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 256])], [w])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["h"], then_branch=branch("then", 0.1), else_branch=branch("else", 0.2)),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "control_flow",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def unsupported_op(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("FancyWarp", ["x"], ["y"], domain="com.example.custom")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example.custom", 1)])
    onnx.save(model, str(path))
    return path


def scaler_mlp(path: Path, *, seed: int = 0) -> Path:
    """A scikit-learn-style pipeline (ai.onnx.ml Scaler → MLP), as skl2onnx exports it. ONNX Runtime runs it, but
    its symbolic shape inference stops at the Scaler ("Incomplete symbolic shape inference")."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Scaler", ["x"], ["s"], domain="ai.onnx.ml", offset=[0.5] * 16, scale=[2.0] * 16),
        helper.make_node("MatMul", ["s", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "sklearn_pipeline", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                              [1, 16])], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
                              [_weight(rng, "w1", 16, 64), _weight(rng, "w2", 64, 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class GroupedConvNet(nn.Module):
    """Grouped convolutions with two outputs per input channel (as in some exported detectors' necks).
    ONNX Runtime's x86 CPU has no fast INT8 kernel for them, so INT8 runs slower than FP32."""

    def __init__(self, width: int = 32, layers: int = 3, classes: int = 10):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        c = width
        for _ in range(layers):
            mods += [nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), nn.ReLU()]
            c *= 2
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def grouped_conv_net(path: Path, *, size: int = 48, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return export(GroupedConvNet(), (torch.randn(1, 3, size, size),), path, input_names=["input"],
                  output_names=["logits"])


def slow_mlp(path: Path, *, layers: int = 30, width: int = 256, seed: int = 0) -> Path:
    """Same interface as ``mlp_opset`` (x: 1×3×16×16 → y: 1×10) but ~100× the work in a small file: the input as
    48 rows of 16, then one shared square MatMul applied ``layers`` times. A model that makes latency regress."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([48, 16], dtype=np.int64), "shape"),
             numpy_helper.from_array((rng.standard_normal((16, width)) / 4).astype(np.float32), "w_in"),
             numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((width, 10)) * 0.05).astype(np.float32), "w_out")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w_in"], ["h0"])]
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"])]
    nodes += [helper.make_node("ReduceMean", [f"h{layers}"], ["pooled"], axes=[0], keepdims=1),
              helper.make_node("MatMul", ["pooled", "w_out"], ["y"])]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
