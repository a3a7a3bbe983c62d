"""The inference runtimes behind one interface (ONNX Runtime, LiteRT, tflite-runtime), device-safe: the agent
serves with it and the converters make each artifact's golden probe with it, so a device compares like with like.
Neither side imports the other."""
