"""Compute kernels, installed as ``embedserve.kernels``. Each kernel has a pure-torch twin.

This folder sits at the top of the repository, so any process whose ``sys.path`` holds the checkout (``python -m
...`` or ``python -c`` started there, an editable install in setuptools' compat mode) can find it as a top-level
``kernels``: the import name of Hugging Face's ``kernels`` distribution, which transformers >= 5 depends on and
imports. Imported under that name, this file steps aside: it loads the ``kernels`` the rest of ``sys.path`` holds,
or fails as if the checkout were not there. The entry points (``python -m embedserve``, the test suite) also keep
the checkout off ``sys.path`` (``embedserve.keep_checkout_off_path``), so lookups do not find this folder at all.
"""

if __name__ == "kernels":
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    def _elsewhere():
        checkout = Path(__file__).resolve().parent.parent
        path = [p for p in sys.path if isinstance(p, str) and Path(p or ".").resolve() != checkout]
        spec = PathFinder.find_spec("kernels", path)
        if spec is None:  # another meta-path finder (an editable install of that distribution)
            for finder in sys.meta_path:
                if finder is not PathFinder and hasattr(finder, "find_spec"):
                    spec = finder.find_spec("kernels", None)
                    if spec is not None and Path(spec.origin or "").resolve() != Path(__file__).resolve():
                        break
                    spec = None
        return spec

    _spec = _elsewhere()
    del sys.modules["kernels"]
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = module_from_spec(_spec)
    # The import statement that brought us here returns whatever sys.modules holds under the name afterwards.
    sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
