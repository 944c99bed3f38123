"""Old import path, an alias of :mod:`ckpt_core.content.states`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import states as _moved

sys.modules[__name__] = _moved
