"""`python -m loopnn ...` (torchrun launches modules: `torchrun --nproc_per_node=N -m loopnn train ...`)."""

import sys

from loopnn.cli import main

sys.exit(main())
