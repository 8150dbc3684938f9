"""python -m libmesh.proxy: the libmesh-proxy command."""

import sys

from ._main import main

sys.exit(main())
