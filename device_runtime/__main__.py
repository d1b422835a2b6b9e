import sys

from ._train import main

sys.exit(main())
