"""Tests of onnxcompress.pruning."""
