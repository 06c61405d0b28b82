import sys

from ptgraph.cli import main

sys.exit(main())
