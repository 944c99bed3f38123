"""Old import path, an alias of :mod:`ckpt_core.storage.async_writer`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.storage import async_writer as _moved

sys.modules[__name__] = _moved
