import sys

from mftcoder.cli import main

sys.exit(main())
