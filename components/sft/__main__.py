"""`python -m components.sft --config FILE`."""

import sys

from components.training.entrypoint import main

sys.exit(main(["sft", *sys.argv[1:]]))
