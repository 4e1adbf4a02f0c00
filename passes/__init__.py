"""Built-in pipeline recipes (TOML files), installed as the ``onnxcompress._recipes`` package."""
