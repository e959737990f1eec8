"""Run a numbered script's function in spawned worker processes, from a script or a notebook.

``torch.multiprocessing.start_processes(fn, ...)`` pickles ``fn`` by reference, and a child
started with "spawn" must import it. A function defined in a notebook kernel (or in a script
imported under another name, as the tests do) cannot be imported by a child, so the children
start HERE, in an importable module, and load the script by path. A script's top level runs no
lesson when imported (see common.run), so loading it only defines its functions.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def call_in_script(index: int, script: str, function: str, *args: object) -> None:
    """Entry point for ``start_processes``: load ``script``, call ``function(index, *args)``."""
    name = f"lesson_{Path(script).stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, script)
        if spec is None or spec.loader is None:
            raise ImportError(f"{script}: cannot be loaded as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pickling and dataclasses look classes up here
        spec.loader.exec_module(module)
    getattr(module, function)(index, *args)
