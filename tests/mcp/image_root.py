"""Writes the root filesystem of the test bed's Python MCP server image: this interpreter, its
standard library, the distributions `server.py` imports (the `mcp` SDK and uvicorn, with what
they require), `server.py` itself, and the shared libraries all of that links, found by ldd.

    python image_root.py ROOT

Run by the venv's interpreter (MCP_TEST_PYTHON), so that the image holds what the tests run
outside it. The interpreter goes to /opt/python (its libraries found through LD_LIBRARY_PATH,
which the image's configuration sets), the server to /app. Prints the interpreter's path in
the image.
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig

# What server.py imports at the top level; the rest follows from their requirements.
ROOTS = ["mcp", "uvicorn"]
# Parts of the standard library a server never imports: its tests, tools and GUI.
STDLIB_LEFT_OUT = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
PREFIX = "/opt/python"


def requirements(dist, extras: set[str]) -> list[tuple[str, set[str]]]:
    """The distributions `dist` requires here, with `extras` of its own asked for: (name, the
    extras asked of it)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    required = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            required.append((requirement.name, set(requirement.extras)))
    return required


def closure(roots: list[str]) -> list:
    """The installed distributions `roots` need, each once."""
    seen, todo, found = {}, [(name, set()) for name in roots], []
    while todo:
        name, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen and extras <= seen[key]:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if key not in seen:
            found.append(dist)
        seen[key] = seen.get(key, set()) | extras
        todo.extend(requirements(dist, seen[key]))
    return found


def copy(source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(source, target, follow_symlinks=True)


def linked_libraries(files: list[str]) -> set[str]:
    """Every shared library ldd resolves for `files` (ELF files only; the rest it refuses)."""
    libraries = set()
    for path in files:
        result = subprocess.run(["ldd", path], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            resolved = re.search(r"(/\S+) \(0x", line)
            if resolved:
                libraries.add(resolved.group(1))
    return libraries


def main(root: str) -> None:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_paths()["stdlib"]
    target_lib = f"{root}{PREFIX}/lib/{version}"
    copy(interpreter, f"{root}{PREFIX}/bin/{version}")
    os.symlink(version, f"{root}{PREFIX}/bin/python3")
    shutil.copytree(
        stdlib,
        target_lib,
        ignore=lambda directory, names: [
            n for n in names
            if (directory == stdlib and (n in STDLIB_LEFT_OUT or n.startswith("config-")))
        ],
        symlinks=False,
    )
    elf = [interpreter]
    site = f"{target_lib}/site-packages"
    for dist in closure(ROOTS):
        for file in dist.files or []:
            source = os.path.realpath(dist.locate_file(file))
            if not os.path.isfile(source) or "__pycache__" in str(file):
                continue
            target = os.path.normpath(os.path.join(site, str(file)))
            if not target.startswith(site):
                continue  # scripts installed in the venv's bin/
            copy(source, target)
            if source.endswith(".so"):
                elf.append(source)
    for directory, _, names in os.walk(f"{target_lib}/lib-dynload"):
        elf.extend(os.path.join(directory, n) for n in names if n.endswith(".so"))
    for found in linked_libraries(elf):
        # A shared build's libpython goes beside the interpreter; the system's keep their paths.
        if os.path.basename(found).startswith("libpython"):
            copy(found, f"{root}{PREFIX}/lib/{os.path.basename(found)}")
        else:
            copy(found, f"{root}{found}")
    copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py"), f"{root}/app/server.py")
    os.makedirs(f"{root}/tmp", exist_ok=True)
    os.chmod(f"{root}/tmp", 0o1777)
    print(f"{PREFIX}/bin/{version}")


if __name__ == "__main__":
    main(sys.argv[1])
