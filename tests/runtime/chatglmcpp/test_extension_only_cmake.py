"""extension-only.cmake, which the chatglm-cpp sdist compile gets (the venv and the chatglm.cpp image): the
default build makes the `_C` extension and the libraries it links, and no other target of the bundled ones.

Checked on a small CMake project shaped like chatglm.cpp's: bundled libraries added with add_subdirectory,
each with its own project() and targets the extension does not need, built with a bare `cmake --build`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import builder.runtime.chatglmcpp

INCLUDE = Path(builder.runtime.chatglmcpp.__file__).parent / "extension-only.cmake"

pytestmark = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("c++")), reason="needs cmake and c++")


def _project(root: Path) -> Path:
    files = {
        "CMakeLists.txt": "cmake_minimum_required(VERSION 3.19)\nproject(Top CXX)\n"
        "add_subdirectory(third_party/used)\nadd_subdirectory(third_party/unused)\n"
        "add_library(_C SHARED c.cpp)\ntarget_link_libraries(_C PRIVATE used)\nadd_executable(main main.cpp)\n",
        "c.cpp": "int used();\nint c() { return used(); }\n",
        "main.cpp": "int main() { return 0; }\n",
        "third_party/used/CMakeLists.txt": "project(Used CXX)\nadd_library(used STATIC used.cpp)\n"
        "add_subdirectory(tools)\n",
        "third_party/used/used.cpp": "int used() { return 1; }\n",
        "third_party/used/tools/CMakeLists.txt": "add_executable(used_tool tool.cpp)\n",
        "third_party/used/tools/tool.cpp": "int main() { return 0; }\n",
        "third_party/unused/CMakeLists.txt": "project(Unused CXX)\nadd_library(unused STATIC unused.cpp)\n",
        "third_party/unused/unused.cpp": "int unused() { return 2; }\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _built(src: Path, build: Path, *args: str) -> set[str]:
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *args], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    names = {"lib_C.so": "_C", "libused.a": "used", "used_tool": "used_tool", "libunused.a": "unused", "main": "main"}
    return {target for file, target in names.items() if any(build.rglob(file))}


def test_only_the_extension_and_what_it_links_are_built(tmp_path):
    src = _project(tmp_path / "src")
    assert _built(src, tmp_path / "plain") == {"_C", "used", "used_tool", "unused", "main"}
    assert _built(src, tmp_path / "extension", f"-DCMAKE_PROJECT_INCLUDE={INCLUDE}") == {"_C", "used"}
