"""llama.cpp from one pinned registry package: its source, its converter, and how it is compiled.

The PyPI sdist of llama-cpp-python vendors the whole of llama.cpp (vendor/llama.cpp): the C++
server and quantizer, `convert_hf_to_gguf.py` with its `conversion/` package, and `gguf-py`. Pinning
that sdist by version and hash pins all of them together; nothing is fetched from anywhere else.

Standard library and builder/files.py only, no torch: `make llamacpp` runs
`python -m builder.model.gguf.llamacpp`, and the image build's source stage runs this file alone
(/opt/llamacpp.py, with files.py copied beside it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

try:
    from builder.files import atomic_dir, write_atomic
except ImportError:  # run alone (the image's source stage): builder/files.py is copied beside this file
    from files import atomic_dir, write_atomic

SDIST = "llama-cpp-python"
VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e570"  # vendor/llama.cpp in that sdist (ggml 0.25.3, gguf-py 0.19.0)
TARGETS = ("llama-server", "llama-quantize")
# The quality step's tools (builder/model/quality): KL divergence against the unquantized model, and
# the importance matrix llama-quantize takes. Build stage and host only: a runtime image never carries
# them (the image's build stage compiles them in the same build tree, into a folder of their own).
QUALITY_TARGETS = ("llama-perplexity", "llama-imatrix")
# Fixes to the pinned source, applied when it is extracted: (file, text, replacement, why); each text occurs
# once. The stamp (PATCHES_DIGEST) makes a copy extracted before a change be extracted and built again.
SOURCE_PATCHES = (
    (
        "tools/server/server-models.cpp",
        'if (lowered == "accept-encoding") {',
        'if (lowered == "accept-encoding" || lowered == "connection") {',
        "router mode forwards the client's hop-by-hop Connection header to the child: a keep-alive client (the "
        "openai one) then gets no `Connection: close`, yet the router closes the socket after the response, so "
        "the next request on it fails with 'Server disconnected' (1 in 4 back to back, through Docker's port)",
    ),
    (
        "vendor/cpp-httplib/httplib.cpp",
        "    if (idle_thread_count_ == 0 &&",
        "    if (idle_thread_count_ < jobs_.size() &&",
        "the HTTP thread pool adds a thread only when no thread is idle, but a thread notified of a job counts as "
        "idle until it wakes: a burst of connections is queued behind the few idle threads, and if those are held "
        "by clients that send half a request (read timeout 600 s), the next client waits that long (64 stalled "
        "connections blocked the router in 3 of 3 runs on an idle host)",
    ),
    (
        "tools/perplexity/perplexity.cpp",
        "    llama_backend_free();\n\n    return 0;\n}",
        "    llama_backend_free();\n\n    common_log_pause(common_log_main());\n\n    return 0;\n}",
        "the tools log through a background thread that is deliberately never joined at exit, so on a busy machine "
        "the last lines, the KL-divergence and perplexity statistics the quality step reads among them, were lost "
        "although the run succeeded (3 runs in a row under a parallel test run); pausing the log drains it first",
    ),
    # Image input (vision-language models with an mmproj): limits and no server-side fetch by default. Each
    # limit is an environment variable of the server (the router's children inherit it); 0 turns it off.
    (
        "tools/server/server-common.cpp",
        "#include <random>\n",
        "#include <cstdlib>\n#include <random>\n"
        "static size_t media_limit(const char * name, size_t fallback) {\n"
        "    const char * v = std::getenv(name);\n"
        "    return v && *v ? (size_t) std::strtoull(v, nullptr, 10) : fallback;\n"
        "}\n",
        "the image limits below read the server's environment",
    ),
    (
        "tools/server/server-common.cpp",
        '    if (string_starts_with(url, "http")) {\n',
        '    if (media_limit("LLAMA_MEDIA_MAX_IMAGES", 16) > 0 && out_files.size() >= '
        'media_limit("LLAMA_MEDIA_MAX_IMAGES", 16)) {\n'
        '        throw std::invalid_argument("too many images in one request: at most " + '
        'std::to_string(media_limit("LLAMA_MEDIA_MAX_IMAGES", 16)) + " (LLAMA_MEDIA_MAX_IMAGES)");\n'
        "    }\n"
        '    if (string_starts_with(url, "http") && media_limit("LLAMA_MEDIA_ALLOW_REMOTE", 0) == 0) {\n'
        '        throw std::invalid_argument("image URLs are not fetched by this server: send the image as a "\n'
        '            "data:image/...;base64 URL (the server opts in with LLAMA_MEDIA_ALLOW_REMOTE=1)");\n'
        "    }\n"
        '    if (string_starts_with(url, "http")) {\n',
        "llama-server downloads any http:// image URL a client sends (its HTTP client is built in even without "
        "OpenSSL): a client could make the server reach the network; and nothing bounds the images per request",
    ),
    (
        "tools/server/server-common.cpp",
        "            auto decoded_data = base64_decode(base64_data);\n",
        "            auto decoded_data = base64_decode(base64_data);\n"
        '            const size_t max_bytes = media_limit("LLAMA_MEDIA_MAX_BYTES", 20u << 20);\n'
        "            if (max_bytes > 0 && decoded_data.size() > max_bytes) {\n"
        '                throw std::invalid_argument("image of " + std::to_string(decoded_data.size()) + " bytes is "\n'
        '                    "over the limit of " + std::to_string(max_bytes) + " (LLAMA_MEDIA_MAX_BYTES)");\n'
        "            }\n",
        "no limit on an image's bytes",
    ),
    (
        "tools/server/server-common.cpp",
        '            throw std::runtime_error("Failed to load image or audio file");\n',
        '            throw std::invalid_argument("the image could not be decoded: not a PNG/JPEG/... image, "\n'
        '                "truncated, or over LLAMA_MEDIA_MAX_PIXELS pixels");\n',
        "an undecodable image was a 500 (a server error) instead of a 400 that says what is wrong with the input",
    ),
    (
        "tools/mtmd/mtmd-helper.cpp",
        "        auto * data = stbi_load_from_memory(buf, len, &nx, &ny, &nc, 3);\n",
        '        const char * max_px_env = std::getenv("LLAMA_MEDIA_MAX_PIXELS");\n'
        "        const long long max_px = max_px_env && *max_px_env ? std::atoll(max_px_env) : 16777216LL;\n"
        "        if (max_px > 0 && stbi_info_from_memory(buf, (int) len, &nx, &ny, &nc) && (long long) nx * ny > max_px) {\n"
        '            LOG_ERR("image of %dx%d pixels is over the limit of %lld (LLAMA_MEDIA_MAX_PIXELS)\\n", nx, ny, max_px);\n'
        "            return {nullptr, nullptr};\n"
        "        }\n"
        "        auto * data = stbi_load_from_memory(buf, len, &nx, &ny, &nc, 3);\n",
        "stb_image decodes any size up to 2^24 per side: a 20000x20000 PNG of a few hundred KB allocates 1.2 GB "
        "per request; the header's size is read first (stbi_info) and checked against the limit",
    ),
    (
        "tools/mtmd/mtmd-helper.cpp",
        "#include <algorithm>\n",
        "#include <algorithm>\n#include <cstdlib>\n",
        "the pixel limit reads the server's environment",
    ),
)
PATCHES_DIGEST = hashlib.sha256(repr(SOURCE_PATCHES).encode()).hexdigest()[:12]
PATCH_STAMP = ".builder-patches"
# The host's copy (`make llamacpp`): source, and the test build of llama-server and llama-quantize, in
# the checkout's .cache/ (this file also runs alone, copied with files.py into the image build's source stage).
_HERE = Path(__file__).resolve()
HOST_HOME = (_HERE.parents[3] if len(_HERE.parents) > 3 else Path.cwd()) / ".cache" / "llama.cpp" / VERSION

# Every build: Release, no network client (models are baked in), no tests/examples/web UI, and no
# -march=native unless a caller asks for it (GGML_NATIVE=ON only for the host's own test build).
CMAKE_COMMON = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # no web UI: neither npm nor its prebuilt download from a hub bucket
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    f"-DLLAMA_BUILD_COMMIT={COMMIT}",
)
# Images: every CPU variant as a loadable backend; ggml picks the best one the CPU runs at start
# (runtime ISA dispatch), so one image serves from SSE4.2-only hosts to AVX-512/AMX servers.
# Libraries sit next to the binaries and are found through RPATH $ORIGIN.
CMAKE_IMAGE = (
    *CMAKE_COMMON,
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
)
# The image's CPU code: "all-variants" (the default) compiles 15 x86 ISA levels, about four times
# the compile of "avx2": one AVX2/FMA build (like the chatglm.cpp wheel's), for quick builds (the
# demo, the e2e tests) of images that run on any x86-64 CPU from 2013 (Haswell) on.
CPU_BUILDS = {
    "all-variants": ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"),
    "avx2": ("-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_F16C=ON", "-DGGML_FMA=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON"),
}
# The host's test build: one CPU variant for this machine, static binaries (fastest to compile). Without
# AMX: on Sapphire Rapids hosts -march=native compiles ggml's AMX matmul, which crashes on this pin for
# the tests' small models (SIGSEGV in ggml_backend_amx_mul_mat); explicit -mno-amx-* win over -march.
# Release's -O3 stays: -O2 for the C++ would save 15% of the compile but made llama-perplexity on an f16
# model 2.2x slower (ggml-cpu's matmul and vector code is C++).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_HOST = (
    *CMAKE_COMMON,
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
)


def cmake_image_flags(cuda_architectures: str | None = None, cpu: str = "all-variants") -> list[str]:
    """CMake flags of the image build (`cpu`: a CPU_BUILDS key); with CUDA architectures, CUDA too."""
    flags = [*CMAKE_IMAGE, *CPU_BUILDS[cpu]]
    if cuda_architectures:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}"]
    return flags


def log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def fetch_source(out: Path, download_dir: Path | None = None) -> Path:
    """vendor/llama.cpp of the pinned sdist at `out` (hash-checked by pip; extracted beside `out`, then renamed)."""
    out = Path(out)
    stamp = out / PATCH_STAMP
    if (out / "convert_hf_to_gguf.py").is_file() and stamp.is_file() and stamp.read_text() == PATCHES_DIGEST:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamacpp-src-", dir=out.parent) as tmp:
        tmp_path = Path(tmp)
        dl = Path(download_dir) if download_dir else tmp_path / "dl"
        dl.mkdir(parents=True, exist_ok=True)
        sdist = dl / f"{SDIST.replace('-', '_')}-{VERSION}.tar.gz"
        if not sdist.is_file():
            req = tmp_path / "requirements.txt"
            req.write_text(f"{SDIST}=={VERSION} --hash=sha256:{SHA256}\n")
            log(f"downloading the {SDIST} {VERSION} sdist (it vendors llama.cpp {COMMIT})")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST]
            cmd += ["--require-hashes", "-r", str(req), "-d", str(dl), "--disable-pip-version-check", "-q"]
            subprocess.run(cmd, check=True)
        _check_sha256(sdist)
        with atomic_dir(out, replace=True) as extracted:  # replaces an incomplete or differently patched copy
            _extract_vendored(sdist, extracted)
            apply_patches(extracted)
    log(f"llama.cpp source at {out}")
    return out


def _extract_vendored(sdist: Path, extracted: Path) -> None:
    """The sdist's vendor/llama.cpp into the folder `extracted` (regular files and folders only)."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    # Regular files and folders only, under vendor/llama.cpp (the "data" filter where this Python has it).
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix) :]
            if not m.name or m.name == ".git" or m.name.startswith(".git/") or ".." in Path(m.name).parts:
                continue
            tar.extract(m, extracted, **safe)
    # The sdist's .git is a file pointing into the sdist's own git dir: without it cmake only
    # warns that there is no repository (and takes LLAMA_BUILD_COMMIT instead).
    (extracted / ".git").unlink(missing_ok=True)
    if not (extracted / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")


def apply_patches(src: Path) -> None:
    """SOURCE_PATCHES onto the extracted source `src`, then the stamp that says which."""
    for name, text, replacement, _why in SOURCE_PATCHES:
        path = src / name
        code = path.read_text()
        if code.count(text) != 1:
            raise RuntimeError(f"{path}: the patched text occurs {code.count(text)} times, not once: {text!r}")
        path.write_text(code.replace(text, replacement))
    (src / PATCH_STAMP).write_text(PATCHES_DIGEST)


def _check_sha256(path: Path) -> None:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != SHA256:
        raise RuntimeError(f"{path}: sha256 {h.hexdigest()} is not the pinned {SHA256}")


def build(src: Path, out: Path, flags: list[str], jobs: int | None = None, targets: tuple[str, ...] = TARGETS) -> Path:
    """Compile `targets` from `src` with `flags`; binaries (and shared libraries) land in `out`."""
    src, out = Path(src).resolve(), Path(out)
    work = out.parent / f"{out.name}.build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = jobs or os.cpu_count() or 2
    log(f"cmake {' '.join(flags)}")
    subprocess.run(["cmake", "-S", str(src), "-B", str(work), *generator, *flags], check=True)
    subprocess.run(["cmake", "--build", str(work), "--target", *targets, "-j", str(jobs)], check=True)
    with atomic_dir(out, replace=True) as staged:
        for f in sorted((work / "bin").iterdir()):
            if f.name in targets or ".so" in f.name:
                shutil.copy2(f, staged / f.name, follow_symlinks=False)
    log(f"built {', '.join(targets)} into {out}")
    return out


def registered_architectures(src: Path) -> list[str]:
    """Architectures the converter maps to a text-model class (conversion/__init__.py TEXT_MODEL_MAP), read
    from the source without importing it (that needs torch)."""
    import ast

    tree = ast.parse((Path(src) / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return sorted(ast.literal_eval(k) for k in node.value.keys if k is not None)
    raise RuntimeError(f"{src}/conversion/__init__.py has no TEXT_MODEL_MAP")


def host_binary(name: str, env_var: str) -> Path:
    """One of TARGETS or QUALITY_TARGETS: $env_var if set, else the host build of `make llamacpp` (which may
    not exist yet); a quality tool also from HOST_HOME/quality-tools (`build_quality_host`) when host/ lacks it."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    path = HOST_HOME / "host" / name
    if name in QUALITY_TARGETS and not path.is_file():
        return HOST_HOME / "quality-tools" / name
    return path


def image_targets(quality: bool = False) -> tuple[str, ...]:
    """What an image's build stage compiles: TARGETS, plus QUALITY_TARGETS when the build measures quality
    (same build tree, so they cost only their own few files). The runtime stage copies TARGETS alone."""
    return (*TARGETS, *QUALITY_TARGETS) if quality else TARGETS


def _build_stamped(out: Path, targets: tuple[str, ...]) -> Path:
    """Build `targets` for this machine into `out`, again only when the pin, flags or targets change."""
    stamp = out / ".built-with"
    # (the targets enter the stamp where they are not TARGETS: a host/ built before the quality tools is rebuilt)
    want = " ".join([VERSION, SHA256, PATCHES_DIGEST, *CMAKE_HOST, *([] if targets == TARGETS else targets)])
    if stamp.is_file() and stamp.read_text() == want and all((out / t).is_file() for t in targets):
        log(f"{out}: up to date")
        return out
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"[llamacpp] need {' and '.join(missing)} to build llama.cpp (apt-get install cmake g++)")
    src = fetch_source(HOST_HOME / "src", HOST_HOME.parent / "dl")
    build(src, out, list(CMAKE_HOST), targets=targets)
    write_atomic(stamp, want)
    return out


HOST_TARGETS = (*TARGETS, *QUALITY_TARGETS)


def build_host() -> Path:
    """The host build in HOST_HOME/host (`make llamacpp`): the server, the quantizer and the quality tools
    in one build tree (the two tools add only their own files), rebuilt only when the pin or the flags change
    (a stamp records them)."""
    return _build_stamped(HOST_HOME / "host", HOST_TARGETS)


def build_quality_host() -> Path:
    """llama-perplexity and llama-imatrix alone, in HOST_HOME/quality-tools (an own build tree; `make llamacpp`
    builds them in host/ instead, which `host_binary` looks in first)."""
    return _build_stamped(HOST_HOME / "quality-tools", QUALITY_TARGETS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m builder.model.gguf.llamacpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("source", help="Fetch the pinned llama.cpp source.")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--download-dir", type=Path, help="Keep (and reuse) the sdist here.")
    b = sub.add_parser("build", help="Fetch and compile llama-server and llama-quantize.")
    b.add_argument("--src", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--host", action="store_true", help="This machine only (-march=native, static).")
    b.add_argument("--cuda-architectures", help="Also build the CUDA backend for these architectures.")
    b.add_argument("--download-dir", type=Path)
    b.add_argument("-j", "--jobs", type=int)
    sub.add_parser(
        "host", help=f"Fetch and build {', '.join(HOST_TARGETS)} for this machine into {HOST_HOME} (`make llamacpp`)."
    )
    sub.add_parser("quality-tools", help=f"Build {', '.join(QUALITY_TARGETS)} for this machine (once).")
    r = sub.add_parser("architectures", help="Print the architectures the converter registers.")
    r.add_argument("--src", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "architectures":
        print("\n".join(registered_architectures(fetch_source(a.src))))
        return 0
    if a.cmd == "source":
        fetch_source(a.out, a.download_dir)
        return 0
    if a.cmd == "host":
        build_host()
        return 0
    if a.cmd == "quality-tools":
        build_quality_host()
        return 0
    fetch_source(a.src, a.download_dir)
    flags = list(CMAKE_HOST) if a.host else cmake_image_flags(a.cuda_architectures)
    build(a.src, a.out, flags, a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
