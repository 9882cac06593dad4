import sys

from moevlm.cli import main

sys.exit(main())
