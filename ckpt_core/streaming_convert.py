"""Old import path, an alias of :mod:`ckpt_core.convert.streaming`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.convert import streaming as _moved

sys.modules[__name__] = _moved
