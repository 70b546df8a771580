"""Build of the optional compiled FOP kernel; everything else is in pyproject.toml.

The kernel (sklearn_bayes_transfer/_kernels/fop.c) is compiled when the package is installed,
once per instruction-set level on x86-64 (generic, x86-64-v3, x86-64-v4) so that the running CPU
picks its best one at import; with OpenMP when the compiler offers it, else without. A level that
does not compile is skipped, and without any C compiler the package installs all the same and
FOP runs as torch operations.
"""

import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_BASE = ["-O3", "-std=c11", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros"]
_LEVELS = {"generic": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    _LEVELS.update({"x86_64_v3": ["-march=x86-64-v3"], "x86_64_v4": ["-march=x86-64-v4", "-mprefer-vector-width=512"]})


def _extension(level: str, flags: list[str]) -> Extension:
    name = f"_fop_{level}"
    return Extension(f"sklearn_bayes_transfer._kernels.{name}", sources=["sklearn_bayes_transfer/_kernels/fop_module.c"],
                     define_macros=[("BT_MODULE", name)], extra_compile_args=_BASE + flags)


class OptionalBuildExt(build_ext):
    """Each kernel with OpenMP, else without it, else not at all (a warning, never a failed install)."""

    def build_extension(self, ext: Extension) -> None:
        plain_compile, plain_link = list(ext.extra_compile_args), list(ext.extra_link_args or [])
        for openmp in (True, False):
            ext.extra_compile_args = plain_compile + (["-fopenmp"] if openmp else [])
            ext.extra_link_args = plain_link + (["-fopenmp"] if openmp else [])
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler or linker failure
                reason = exc
        self.warn(f"skipping the optional compiled kernel {ext.name} ({reason}); FOP uses torch operations there")


setup(ext_modules=[_extension(level, flags) for level, flags in _LEVELS.items()], cmdclass={"build_ext": OptionalBuildExt})
