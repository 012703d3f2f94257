"""python -m streamgen ... (same as the `streamgen` command)."""
import sys

from .cli import main

sys.exit(main())
