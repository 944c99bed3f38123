"""Old import path, an alias of :mod:`ckpt_core.content.owned_only`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import owned_only as _moved

sys.modules[__name__] = _moved
