"""``python -m qmath_megatron`` == ``qmath`` (so ``torchrun -m qmath_megatron ...`` works)."""

import sys

from qmath_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
