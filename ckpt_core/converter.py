"""Old import path, an alias of :mod:`ckpt_core.protocol.converter`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.protocol import converter as _moved

sys.modules[__name__] = _moved
