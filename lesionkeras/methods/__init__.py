"""The training methods, one module each; importing the package registers them all.

A module registers its `Method` subclass(es) with `lesionkeras.training.method.register`
and its config table with `lesionkeras.config.register_section`; nothing else lists them.
A large method keeps its step and wrapper model in `<method>_step.py` (and other
helpers in `<method>_*.py`) beside it; those register no method and no table.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
