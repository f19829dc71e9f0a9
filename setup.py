"""Package layout: the user-facing folders become subpackages of one import root, `moss_speech`.

Nothing named `builders` or `services` lands bare in site-packages; subpackages are discovered so new modules
need no edit here. A non-editable build also generates the gRPC stubs from proto/ (grpcio-tools is a build
requirement), so an installed package needs neither the .proto files nor write access. Everything else lives in
pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

FOLDERS = {
    "builders": "moss_speech.builders",
    "services": "moss_speech.services",
    "model_repository": "moss_speech.model_repository",
    "contract": "moss_speech.contract",
    "cli": "moss_speech.cli",
}

package_dir = {}
packages = []
for folder, name in FOLDERS.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location("codegen", here / "services" / "api" / "codegen.py")
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate(here / "proto", Path(self.build_lib) / "moss_speech" / "services" / "api" / "_gen")


setup(package_dir=package_dir, packages=packages, cmdclass={"build_py": BuildWithStubs})
