"""Old import path, an alias of :mod:`ckpt_core.content.transforms`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import transforms as _moved

sys.modules[__name__] = _moved
