import sys

from components.training.entrypoint import main

sys.exit(main())
