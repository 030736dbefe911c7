import sys

from dimec.cli import main

sys.exit(main())
