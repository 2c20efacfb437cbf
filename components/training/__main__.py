import sys

from vlpipe.components.training.entrypoint import main

sys.exit(main())
