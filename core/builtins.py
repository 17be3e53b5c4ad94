"""Every built-in component, imported explicitly (the list is :data:`rex.config.index.MODULES`).

The registry imports built-in modules on demand; importing this module registers them all at
once, for code that wants the whole registry in memory.
"""

import importlib

from rex.config.index import MODULES

for _module in MODULES:
    importlib.import_module(_module)
