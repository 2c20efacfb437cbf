"""`python -m components.mpo --config FILE`."""

import sys

from components.training.entrypoint import main

sys.exit(main(["mpo", *sys.argv[1:]]))
