import sys

from backsmooth.cli import main

sys.exit(main())
