"""`python -m vlpipe.components.prm --config FILE`."""

import sys

from vlpipe.components.training.entrypoint import main

sys.exit(main(["prm", *sys.argv[1:]]))
