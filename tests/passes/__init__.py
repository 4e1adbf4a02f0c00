"""Tests of onnxcompress.passes."""
