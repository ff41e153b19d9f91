import sys

from bptt.cli import main

sys.exit(main())
