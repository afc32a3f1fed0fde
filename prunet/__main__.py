import sys

from prunet.cli import main

sys.exit(main())
