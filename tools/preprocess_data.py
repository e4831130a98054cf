#!/usr/bin/env python
"""Tokenize corpora into a Megatron indexed dataset: the same code as `qmath data tokenize`.

    python tools/preprocess_data.py --input 'data/*.jsonl.zst' --output-prefix out/math \
        --tokenizer tok/ --workers 16
"""

import sys

from qmath_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "tokenize", *sys.argv[1:]]))
