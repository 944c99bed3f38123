"""Old import path, an alias of :mod:`ckpt_core.content.families`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import families as _moved

sys.modules[__name__] = _moved
