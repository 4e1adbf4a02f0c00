"""``python -m onnxcompress``."""

import sys

from onnxcompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
