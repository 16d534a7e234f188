import sys

from polarsparse.cli import main

sys.exit(main())
