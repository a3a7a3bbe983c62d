"""ONNX → PyTorch for the Core ML route: onnx2torch, plus what real graphs need from it.

- opset revisions that only added input types reuse the previous revision's converter (Reshape 19/21, Shape, Cast…);
- LSTM maps onto ``torch.nn.LSTM`` (CRNN text recognisers);
- BatchNormalization works at any rank (shape inference sometimes loses it);
- weights kept in Constant nodes (paddle2onnx exports) move to initializers, which is where onnx2torch reads them.

Imported by the worker process only (``converters.coreml_worker``): torch and onnx2torch load inside the functions.
"""

from __future__ import annotations

TYPE_ONLY_REVISIONS = {"Reshape": {19: 14, 21: 14}, "Shape": {19: 15, 21: 15}, "Identity": {19: 16, 21: 16},
                       "Cast": {19: 13, 21: 13}, "Constant": {19: 13, 21: 13}, "Flatten": {21: 13},
                       "Squeeze": {21: 13}, "Unsqueeze": {21: 13}, "Transpose": {21: 13}, "Size": {19: 13, 21: 13},
                       "ConstantOfShape": {20: 9, 21: 9}, "Equal": {19: 13}}


def _register_type_only_revisions() -> None:
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    for op, revisions in TYPE_ONLY_REVISIONS.items():
        for new, old in revisions.items():
            known = _CONVERTER_REGISTRY.get(OperationDescription("", op, old))
            if known is not None:
                _CONVERTER_REGISTRY.setdefault(OperationDescription("", op, new), known)


def _register_lstm() -> None:
    """onnx2torch has no LSTM converter (CRNN text recognisers use one): the common form (default activations, no
    peepholes, clip or sequence lengths, layout 0) maps onto ``torch.nn.LSTM``, which coremltools converts."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    for version in (7, 14, 22):
        _CONVERTER_REGISTRY.setdefault(OperationDescription("", "LSTM", version), _convert_lstm)


def _convert_lstm(node, graph):
    import torch
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    names = list(node.input_values) + [""] * (8 - len(node.input_values))
    x, w, r, b, lengths, h0, c0, peepholes = names
    attrs = node.attributes
    unsupported = [a for a in ("activations", "clip", "input_forget") if attrs.get(a)] + \
        (["layout=1"] if attrs.get("layout", 0) else []) + (["sequence_lens"] if lengths else []) + \
        (["peepholes"] if peepholes else []) + [i for i in (w, r, b) if i and i not in graph.initializers]
    if unsupported:
        raise NotImplementedError(f"LSTM with {', '.join(unsupported)}")  # to_torch names it in its refusal
    weights = {k: torch.from_numpy(graph.initializers[n].to_numpy().copy()) for k, n in (("w", w), ("r", r))}
    hidden, dirs = weights["r"].shape[-1], weights["w"].shape[0]
    lstm = torch.nn.LSTM(weights["w"].shape[-1], hidden, bidirectional=dirs == 2)
    order = torch.cat([torch.arange(k * hidden, (k + 1) * hidden) for k in (0, 2, 3, 1)])  # ONNX iofc → torch ifgo
    bias = torch.from_numpy(graph.initializers[b].to_numpy().copy()) if b else torch.zeros(dirs, 8 * hidden)
    with torch.no_grad():
        for d, suffix in enumerate(["_l0", "_l0_reverse"][:dirs]):
            getattr(lstm, "weight_ih" + suffix).copy_(weights["w"][d][order])
            getattr(lstm, "weight_hh" + suffix).copy_(weights["r"][d][order])
            getattr(lstm, "bias_ih" + suffix).copy_(bias[d, :4 * hidden][order])
            getattr(lstm, "bias_hh" + suffix).copy_(bias[d, 4 * hidden:][order])
    module = _lstm_module(lstm, has_state=bool(h0 and c0))
    inputs = (x, h0, c0) if h0 and c0 else (x,)
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs,
                                                                                 outputs=node.output_values))


def _lstm_module_class():
    import torch

    class OnnxLstm(torch.nn.Module):
        """ONNX LSTM outputs from ``torch.nn.LSTM``: Y [seq, dirs, batch, hidden], Y_h and Y_c [dirs, batch, hidden]."""

        def __init__(self, lstm: torch.nn.LSTM, has_state: bool):
            super().__init__()
            self.lstm, self.has_state = lstm, has_state

        def forward(self, x, h0=None, c0=None):
            y, (h, c) = self.lstm(x, (h0, c0)) if self.has_state else self.lstm(x)
            dirs = 2 if self.lstm.bidirectional else 1
            return y.reshape(y.shape[0], y.shape[1], dirs, -1).permute(0, 2, 1, 3), h, c

    return OnnxLstm


def _lstm_module(lstm, has_state: bool):  # the class is built lazily: torch loads in the worker only
    return _lstm_module_class()(lstm, has_state)


def _register_rank_free_batchnorm() -> None:
    """onnx2torch picks BatchNorm1d/2d/3d from the input's inferred rank; where ONNX shape inference loses the rank
    (PP-OCRv4's recogniser, after its attention blocks) it gives up. ``batch_norm`` itself takes any rank."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    for version in (9, 14, 15):
        key = OperationDescription("", "BatchNormalization", version)
        by_rank = _CONVERTER_REGISTRY.get(key)
        if by_rank is not None and not getattr(by_rank, "rank_free", False):
            _CONVERTER_REGISTRY[key] = _rank_free_batchnorm(by_rank)


def _rank_free_batchnorm(by_rank):
    def convert(node, graph):
        import torch
        from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

        try:
            return by_rank(node, graph)
        except NotImplementedError:
            params = node.input_values[1:5]
            if len(node.output_values) != 1 or not all(p in graph.initializers for p in params):
                raise
        scale, bias, mean, var = (torch.from_numpy(graph.initializers[p].to_numpy().copy()) for p in params)
        norm = torch.nn.BatchNorm1d(len(mean), eps=node.attributes.get("epsilon", 1e-5))
        with torch.no_grad():
            for name, value in (("weight", scale), ("bias", bias), ("running_mean", mean), ("running_var", var)):
                getattr(norm, name).copy_(value)
        norm._check_input_dim = lambda _x: None  # BatchNorm1d's own rank check is the only rank-specific part
        return OperationConverterResult(torch_module=norm.eval(), onnx_mapping=OnnxMapping(
            inputs=(node.input_values[0],), outputs=node.output_values))

    convert.rank_free = True
    return convert


def _constants_to_initializers(model) -> int:
    """Move Constant nodes' tensors into initializers: onnx2torch reads Conv / MatMul / Gemm weights from
    initializers only (paddle2onnx models keep every weight in a Constant node). Returns how many moved."""
    from onnx import numpy_helper

    graph, moved = model.graph, []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            graph.initializer.append(tensor)
            moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return len(moved)


def to_torch(onnx_path: str, notes: list[str]):
    """The ONNX model as a PyTorch module (onnx2torch), with the converters real graphs need registered first."""
    import re

    import onnx
    import onnx2torch

    _register_type_only_revisions()
    _register_lstm()
    _register_rank_free_batchnorm()
    model = onnx.load(onnx_path)
    for node in model.graph.node:  # onnx2torch reads a trailing "" (an omitted optional input) as a value's name
        while node.input and not node.input[-1]:
            node.input.pop()
    moved = _constants_to_initializers(model)
    if moved:
        notes.append(f"{moved} Constant node(s) moved to initializers for the ONNX → PyTorch translation")
    try:
        return onnx2torch.convert(model).eval()
    except NotImplementedError as e:  # "Converter is not implemented (OperationDescription(... 'GRU', version=14))"
        op = re.search(r"operation_type='(\w+)', version=(\d+)", str(e))
        what = f"{op.group(1)} (opset {op.group(2)})" if op else str(e)
        raise RuntimeError(f"the Core ML route (ONNX → PyTorch → Core ML) has no conversion for {what}") from e
