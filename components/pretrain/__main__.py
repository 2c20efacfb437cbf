"""`python -m vlpipe.components.pretrain --config FILE`."""

import sys

from vlpipe.components.training.entrypoint import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
