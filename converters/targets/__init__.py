"""One pass per target format: each turns the pipeline's shared work (the source, its FP32 reference outputs, the
pre-processed graph, calibration and evaluation data) into a candidate artifact for one profile and the report fields
that belong to that format (a ``TargetResult``). The low-level builders they drive stay beside them in
``converters/`` (``onnx_int8``, ``tflite_int8``, ``coreml_int8``); the pipeline writes the artifact and assembles
the report.
"""
