"""Old import path, an alias of :mod:`ckpt_core.content.train_state`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import train_state as _moved

sys.modules[__name__] = _moved
