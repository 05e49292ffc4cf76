"""``python -m dtx.lab.forwarder --lab PREFIX``: the link forwarder process
(see :mod:`dtx.lab.netem`). A module of its own so that running it does not
import :mod:`dtx.lab.netem` twice."""

import sys

from dtx.lab.netem import main

if __name__ == "__main__":
    sys.exit(main())
