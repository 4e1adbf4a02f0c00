"""Built-in pipeline recipes (TOML files), installed as the ``onnxcompress.recipes`` package."""
