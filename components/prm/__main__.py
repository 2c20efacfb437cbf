"""`python -m components.prm --config FILE`."""

import sys

from components.training.entrypoint import main

sys.exit(main(["prm", *sys.argv[1:]]))
