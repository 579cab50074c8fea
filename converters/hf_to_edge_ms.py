"""Convert a Hugging Face MetaStone-S1 checkpoint; the same as ``edge-ms convert`` (see README.md here)."""

import sys

from edge_ms.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
