"""`python -m components.pretrain --config FILE`."""

import sys

from components.training.entrypoint import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
