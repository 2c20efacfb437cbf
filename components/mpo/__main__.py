"""`python -m vlpipe.components.mpo --config FILE`."""

import sys

from vlpipe.components.training.entrypoint import main

sys.exit(main(["mpo", *sys.argv[1:]]))
