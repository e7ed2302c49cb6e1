"""`python -m fused_lora`: the command line (fused_lora.cli.main)."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
