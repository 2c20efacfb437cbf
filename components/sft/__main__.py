"""`python -m vlpipe.components.sft --config FILE`."""

import sys

from vlpipe.components.training.entrypoint import main

sys.exit(main(["sft", *sys.argv[1:]]))
