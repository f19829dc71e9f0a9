"""Package layout: the user-facing folders become subpackages of one import root, `moss_speech`.

Nothing named `builders` or `services` lands bare in site-packages; subpackages are discovered so new modules
need no edit here. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "builders": "moss_speech.builders",
    "services": "moss_speech.services",
    "model_repository": "moss_speech.model_repository",
}

package_dir = {}
packages = []
for folder, name in FOLDERS.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(package_dir=package_dir, packages=packages)
