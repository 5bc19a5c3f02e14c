"""Compile the hot-path modules (proxycore/compiled.py: HOT_MODULES) with mypyc, in place.

Run by `make setup` when one of them changed. mypyc type-checks them first (a
type error stops the build); the C goes to build/mypyc, the extensions next to
their sources. Without a C compiler or mypyc this says so and leaves the
sources to run as they are (exit 0): the proxies work the same, only slower.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxycore.compiled import GROUP, HOT_MODULES, MANIFEST, source_of, write_manifest  # noqa: E402


def main() -> int:
    compiler = sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        print(f"compile_hot: no C compiler ({compiler}); the hot path runs interpreted")
        return 0
    try:
        from mypyc.build import mypycify
        from setuptools import setup
    except ImportError:
        print("compile_hot: mypyc is not installed; the hot path runs interpreted")
        return 0
    os.chdir(ROOT)
    # A half-done build must not look fresh: the manifest is written last.
    (ROOT / "proxycore" / MANIFEST).unlink(missing_ok=True)
    paths = [str(source_of(m).relative_to(ROOT)) for m in HOT_MODULES]
    # Errors in modules they merely import and that stay interpreted (checks,
    # admin, health, dbproxy.config) are not the build's business.
    flags = ["--follow-imports=silent", "--ignore-missing-imports"]
    extensions = mypycify(
        [*flags, *paths],
        opt_level="3",
        group_name=GROUP,
        target_dir="build/mypyc",
        verbose=False,
    )
    setup(
        name="balance-hot-path",
        ext_modules=extensions,
        script_args=[
            "--quiet",
            "build_ext",
            "--inplace",
            "--force",
            "--build-temp",
            "build/mypyc-obj",
        ],
    )
    write_manifest()
    print(f"compile_hot: compiled {len(paths)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
