import sys

from stagewise.cli import main

sys.exit(main())
