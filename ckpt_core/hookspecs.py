"""Old import path, an alias of :mod:`ckpt_core.protocol.hookspecs`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.protocol import hookspecs as _moved

sys.modules[__name__] = _moved
