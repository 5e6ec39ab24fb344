"""`python -m lorakit.serve ...` is `lorakit serve ...`."""

import sys

from lorakit.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
