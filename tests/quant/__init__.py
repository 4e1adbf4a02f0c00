"""Tests of onnxcompress.quant."""
