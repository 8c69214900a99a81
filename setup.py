"""Build the Cython hot path when possible; fall back to the pure-Python package otherwise.

AGENTAUTHZ_NO_EXTENSIONS=1 (or true/yes/on) skips the native build entirely.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Every native twin builds into the subpackage of its pure twin (the hot path, agentauthz.decision).
PACKAGE = "agentauthz.decision"
NATIVE_MODULES = ["_bitset_c", "_strict_c", "_request_c", "_http_c", "_token_c", "_verify_c", "_chain_c", "_check_c"]
_TRUE = {"1", "true", "yes", "on"}


class OptionalBuildExt(build_ext):
    """Compile the extensions, but never fail the install over them: pure Python still works."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: say so and continue pure
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            "\n*** agentauthz: the native extension could not be built "
            f"({exc.__class__.__name__}: {exc}).\n"
            "*** Installing the pure-Python implementation; it is correct but slower.\n\n"
        )


def _pxd_include_dir():
    """Stage native/*.pxd as agentauthz/decision/*.pxd, the only place Cython looks for them.

    Cython finds the declarations of a module named agentauthz.decision._x (its own
    and every cimport of it) at <include dir>/agentauthz/decision/_x.pxd, never beside
    the .pyx under native/: without this the .pxd files would be silently ignored.
    The empty __init__.pxd files make the staged folders packages to Cython.
    """
    stage = os.path.join("build", "cython-include")
    package = os.path.join(stage, *PACKAGE.split("."))
    os.makedirs(package, exist_ok=True)
    for folder in (os.path.join(stage, "agentauthz"), package):
        open(os.path.join(folder, "__init__.pxd"), "a").close()
    for name in NATIVE_MODULES:
        shutil.copy2(os.path.join("native", f"{name}.pxd"), package)
    return stage


def extensions():
    if os.environ.get("AGENTAUTHZ_NO_EXTENSIONS", "").strip().lower() in _TRUE:
        sys.stderr.write("*** agentauthz: AGENTAUTHZ_NO_EXTENSIONS set, building pure Python only\n")
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as exc:
        sys.stderr.write(f"*** agentauthz: Cython unavailable ({exc}); pure Python only\n")
        return []
    exts = [
        Extension(f"{PACKAGE}.{name}", [f"native/{name}.pyx"], include_dirs=["native"])
        for name in NATIVE_MODULES
    ]
    return cythonize(exts, compiler_directives={"language_level": "3"},
                     include_path=[_pxd_include_dir(), "native"])


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
