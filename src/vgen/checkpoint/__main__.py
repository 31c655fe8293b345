import sys

from vgen.checkpoint.export import main

sys.exit(main())
