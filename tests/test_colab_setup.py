"""Every chapter's setup cell, as Colab runs it.

Each chapter's first code cell is its setup cell. It opens with one bootstrap block, the same in every chapter:
on Colab (or with ``COMPINV_BOOTSTRAP=1``) it clones the repository once, pip-installs it once as a regular
package, points ``COMPINV_DATA`` at the clone's ``data/`` and moves into the clone's ``notebooks/``.

The fast tests read the notebooks and README as they are in the working tree: the bootstrap block is the same
text in every chapter, its ``REPO`` address is the one every Colab badge opens, every badge opens a chapter
that exists, and the setup cell only sets up (no inversion, generation, Table 1 or training).

The slow test replays the setup cells the way one Colab machine would: a fresh virtual environment (not
``--system-site-packages``) that holds only torch, as Colab's does; ``COMPINV_REPO=file://<this repository>``;
one ``COMPINV_HOME`` for every chapter; a working folder outside the repository; every chapter in turn, in two
rounds. The first chapter clones and installs; every later run must reuse the clone and the installed package.
In the second round each cell runs twice in one process, as a re-run in the same kernel does.

The packages come from a wheel cache that outlives the test (``COMPINV_WHEELHOUSE``, by default
``~/.cache/compinv-tests/wheels``): torch and the committed ``pyproject.toml``'s requirements as wheels. The first
run (or a run after the requirements changed) fills it from the package index with ``pip wheel``; later runs find
every wheel there, so the venv and the setup cells' ``pip install`` run with ``--no-index`` from local files.
Delete the folder to start afresh.

Note: the cells are read from the working tree, but what they clone is this repository's *committed* HEAD,
so the package, its dependencies and data/ that they install and load are the committed ones: commit first.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy that pip vendors
    from pip._vendor import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
README = ROOT / "README.md"
TORCH = "torch==2.13.0"  # what the Makefile installs; Colab comes with its own torch preinstalled
WHEELHOUSE = Path(os.environ.get("COMPINV_WHEELHOUSE")
                  or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compinv-tests" / "wheels")

# The bootstrap block: from the cell's first line up to and including this line.
BLOCK_END = re.compile(r"^\s+os\.chdir\(.*\)\s*(#.*)?$")
GITHUB = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?$")
BADGE = re.compile(r"https://colab\.research\.google\.com/github/([^/\s\"'()<>]+)/([^/\s\"'()<>]+)/blob/"
                   r"([^/\s\"'()<>]+)/([^\s\"'()<>#?]+)")
# Work that a setup cell must not start: inversion, generation, guided generation, Table 1, training.
FORBIDDEN_CALLS = {"invert", "invert_or_load", "generate", "guided_generate", "guided_sample", "table1",
                   "measure_cost", "build_world", "fit"}
FORBIDDEN_PREFIXES = ("invert", "generate", "guided_generate", "table1", "train")
# Names that IPython puts into a kernel's namespace and plain Python does not have.
IPYTHON_ONLY = {"display", "get_ipython", "In", "Out", "_ih", "_oh", "_dh", "_i", "_ii", "_iii", "__IPYTHON__"}

RESULT = "COMPINV_SETUP_RESULT "
EPILOGUE = f"""

# --- appended by tests/test_colab_setup.py ---
import json as _json, os as _os, sys as _sys
import compinv_utils as _cu
print({RESULT!r} + _json.dumps({{"world": world.name, "device": str(world.device), "dtype": str(world.dtype),
    "cwd": _os.getcwd(), "package": _cu.__file__, "data": _os.environ.get("COMPINV_DATA"),
    "executable": _sys.executable}}), flush=True)
"""
# Runs a cell the way a kernel does: `python -c` puts '' (the working folder) first on sys.path, as IPython
# does, and the cell runs in a __main__-like namespace without IPython's extras, argv[2] times in a row in the
# same namespace (a re-run in the same kernel: modules imported, the working folder already moved).
RUNNER = ("import sys; p, n = sys.argv[1], int(sys.argv[2]); g = {'__name__': '__main__'}; "
          "c = compile(open(p, encoding='utf-8').read(), p, 'exec')\n"
          "for _ in range(n): exec(c, g)")


def setup_cell(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name}: no code cell"
    src = code[0]["source"]
    return src if isinstance(src, str) else "".join(src)


def bootstrap_block(path: Path) -> str:
    """The setup cell's text from its first line up to the bootstrap's `os.chdir(...)` line."""
    lines = setup_cell(path).splitlines()
    for i, line in enumerate(lines):
        if BLOCK_END.match(line):
            return "\n".join(lines[: i + 1])
    raise AssertionError(f"{path.name}: the setup cell (first code cell) has no bootstrap block ending in an "
                         f"indented `os.chdir(...)` line")


def repo_address(block: str) -> str:
    for node in ast.parse(block).body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["REPO"]
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise AssertionError('the bootstrap block sets no `REPO = "https://github.com/<owner>/<name>"`')


def called_names(src: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names - {""}


def ipython_only(src: str) -> list[str]:
    """What in a cell only an IPython kernel understands: magics and shell escapes, IPython's own names."""
    lines = src.splitlines()
    magics = [ln.strip() for ln in lines if ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in lines))
    except SyntaxError as e:
        return magics + [f"(not valid Python: {e})"]
    bound = set(dir(builtins)) - IPYTHON_ONLY
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return magics + sorted((used & IPYTHON_ONLY) - bound)


# ---------------------------------------------------------------------------------------------- fast tests

def test_chapters_found():
    assert len(NOTEBOOKS) >= 2, f"no chapters under {ROOT / 'notebooks'}"


def test_every_chapter_opens_with_the_same_bootstrap_block():
    blocks = {p.name: bootstrap_block(p) for p in NOTEBOOKS}
    first, ref = next(iter(blocks.items()))
    for name, block in blocks.items():
        if block != ref:
            diff = "\n".join(difflib.unified_diff(ref.splitlines(), block.splitlines(), first, name, lineterm=""))
            pytest.fail(f"{name}'s bootstrap block differs from {first}'s (keep them identical):\n{diff}")
    compile(ref, "<bootstrap>", "exec")
    assert "COMPINV_BOOTSTRAP" in ref and "google.colab" in ref, "the block runs only on Colab or when asked"
    assert GITHUB.match(repo_address(ref)), f"REPO = {repo_address(ref)!r} is not https://github.com/<owner>/<name>"


def test_every_colab_badge_opens_this_repository_and_an_existing_chapter():
    owner, name = GITHUB.match(repo_address(bootstrap_block(NOTEBOOKS[0]))).groups()
    sources = {"README.md": README.read_text(encoding="utf-8")}
    for p in NOTEBOOKS:
        cells = json.loads(p.read_text(encoding="utf-8"))["cells"]
        sources[p.name] = "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                                    for c in cells if c["cell_type"] == "markdown")
    badges = [(where, m) for where, text in sources.items() for m in BADGE.finditer(text)]
    assert badges, "no Colab badge (https://colab.research.google.com/github/...) in README.md or the chapters"
    problems = []
    for where, m in badges:
        b_owner, b_name, branch, path = m.groups()
        if (b_owner, b_name) != (owner, name):
            problems.append(f"{where}: {m.group(0)} opens {b_owner}/{b_name}, but REPO is {owner}/{name}")
        if branch != "main":
            problems.append(f"{where}: {m.group(0)} opens branch {branch!r}; the bootstrap clones main")
        if not (path.startswith("notebooks/") and path.endswith(".ipynb") and (ROOT / path).is_file()):
            problems.append(f"{where}: {m.group(0)} opens {path}, which is not a chapter in this repository")
    assert not problems, "\n".join(problems)
    opened = {m.group(4) for _, m in badges}
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in opened]
    assert not missing, f"no Colab badge opens {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_setup_cell_only_sets_up(path):
    src = setup_cell(path)
    only = ipython_only(src)
    assert not only, f"{path.name}: the setup cell uses what only IPython has ({only}); Colab's bootstrap " \
                     f"must also run as plain Python"
    bad = sorted(n for n in called_names(src) if n in FORBIDDEN_CALLS or n.startswith(FORBIDDEN_PREFIXES))
    assert not bad, f"{path.name}: the setup cell calls {bad}; it should only set up (install, import, load)"


# ---------------------------------------------------------------------------------------------- slow test

def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMPINV_", "GIT_", "PYTHON", "VIRTUAL_ENV", "CONDA", "__PYVENV"))
           and k not in {"PIP_NO_CACHE_DIR", "PIP_USER", "PIP_TARGET", "PIP_PREFIX", "MPLBACKEND"}}
    env.update(extra)
    return env


def _run(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _stat(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def committed_requirements() -> list[str]:
    """What `pip install <clone of HEAD>` needs: the committed pyproject.toml's build backend and dependencies."""
    r = _run(["git", "show", "HEAD:pyproject.toml"], 60, cwd=ROOT)
    assert r.returncode == 0, f"git show HEAD:pyproject.toml failed: {r.stderr}"
    project = tomllib.loads(r.stdout)
    return [*project["build-system"]["requires"], *project["project"].get("dependencies", [])]


def fill_wheelhouse(py: Path, requirements: list[str], env: dict, cwd: Path) -> str:
    """Make WHEELHOUSE hold a wheel for every requirement and their dependencies; 'reused' if it already did."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    pip_wheel = [str(py), "-m", "pip", "wheel", "-q", "--find-links", str(WHEELHOUSE), "-w", str(WHEELHOUSE)]
    if _run([*pip_wheel, "--no-index", *requirements], 600, env=env, cwd=cwd).returncode == 0:
        return "reused"
    r = _run([*pip_wheel, *requirements], 1800, env=env, cwd=cwd)  # from the package index, as Colab would
    assert r.returncode == 0, f"pip wheel into {WHEELHOUSE} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return "filled"


@pytest.fixture(scope="module")
def colab_machine():
    """A fresh venv holding only torch (as Colab comes with it), in a temporary folder removed afterwards;
    pip in it (and in the setup cells run with `pip_env`) installs from the wheel cache alone."""
    if _run(["git", "rev-parse", "HEAD"], 60, cwd=ROOT).returncode != 0:
        pytest.skip(f"{ROOT} is not a git repository with a commit: there is nothing to clone")
    tmp = Path(tempfile.mkdtemp(prefix="compinv-colab-"))
    try:
        venv = tmp / "venv"
        env = _clean_env()
        t0 = time.monotonic()
        r = _run([sys.executable, "-m", "venv", str(venv)], 120, env=env, cwd=tmp)
        assert r.returncode == 0, f"python -m venv failed:\n{r.stdout}\n{r.stderr}"
        py = venv / "bin" / "python"
        wheels = fill_wheelhouse(py, [TORCH, *committed_requirements()], env, tmp)
        wheels_s = time.monotonic() - t0
        pip_env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE)}
        r = _run([str(py), "-m", "pip", "install", "-q", TORCH], 600, env={**env, **pip_env}, cwd=tmp)
        assert r.returncode == 0, f"pip install {TORCH} failed:\n{r.stdout}\n{r.stderr}"
        purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60,
                       env=env, cwd=tmp).stdout.strip()
        yield {"tmp": tmp, "venv": venv, "python": py, "site": Path(purelib), "pip_env": pip_env,
               "wheels": wheels, "wheels_s": wheels_s, "torch_s": time.monotonic() - t0 - wheels_s}
    finally:
        if not os.environ.get("COMPINV_KEEP_COLAB_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_setup_cells_bootstrap_a_fresh_colab_machine_twice(colab_machine, request):
    dirty = _run(["git", "status", "--porcelain", "--", "compinv_utils", "pyproject.toml", "data"], 60,
                 cwd=ROOT).stdout.strip()
    if dirty:
        warnings.warn(f"uncommitted changes are not in the clone this test makes (it clones HEAD):\n{dirty}")
    m = colab_machine
    tmp, py, site = m["tmp"], m["python"], m["site"]
    home, content, scripts = tmp / "compinv", tmp / "content", tmp / "cells"
    content.mkdir()
    scripts.mkdir()
    env = _clean_env(COMPINV_BOOTSTRAP="1", COMPINV_REPO=f"file://{ROOT}", COMPINV_HOME=str(home),
                     COMPINV_WORLD="toy", PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(m["venv"]),
                     PATH=f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}", **m["pip_env"])

    cells = {}
    for path in NOTEBOOKS:
        src = setup_cell(path)
        only = ipython_only(src)
        assert not only, f"{path.name}: the setup cell uses what only IPython has ({only}); it cannot run " \
                         f"as plain Python (the bootstrap's promise)"
        script = scripts / f"{path.stem}.py"
        script.write_text(src + EPILOGUE, encoding="utf-8")
        cells[path.name] = script

    timings: dict[str, list[float]] = {}
    after_first = None
    for rnd in (1, 2):
        for i, (name, script) in enumerate(cells.items()):
            first = rnd == 1 and i == 0
            t0 = time.monotonic()
            try:
                r = _run([str(py), "-c", RUNNER, str(script), str(rnd)], 900 if first else 300,
                         env=env, cwd=content)
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"round {rnd}, {name}: the setup cell ran past {e.timeout} s")
            dt = time.monotonic() - t0
            timings.setdefault(name, []).append(round(dt, 1))
            where = f"round {rnd}, {name} ({dt:.0f} s)"
            assert r.returncode == 0, f"{where}: the setup cell failed (exit {r.returncode}):\n" \
                                      f"{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
            assert len(lines) == rnd, f"{where}: {len(lines)} result lines for {rnd} runs of the cell\n" \
                                      f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            assert len(set(lines)) == 1, f"{where}: a re-run in the same process differs: {lines}"
            got = json.loads(lines[-1][len(RESULT):])
            package = Path(got["package"]).resolve()
            assert got["world"] == "toy", f"{where}: {got}"
            assert (got["device"], got["dtype"]) == ("cpu", "torch.float32"), f"{where}: {got}"
            assert Path(got["cwd"]).resolve() == (home / "notebooks").resolve(), f"{where}: {got}"
            assert Path(got["data"]).resolve() == (home / "data").resolve(), f"{where}: {got}"
            assert Path(got["executable"]).parent == py.parent, f"{where}: not the venv's python: {got}"
            assert package.is_relative_to(site.resolve()), \
                f"{where}: compinv_utils came from {package}, not the venv's site-packages {site}"
            if first:
                assert (home / ".git").is_dir(), f"{where}: no clone in {home}"
                clone_head = _run(["git", "rev-parse", "HEAD"], 60, cwd=home).stdout.strip()
                root_head = _run(["git", "rev-parse", "HEAD"], 60, cwd=ROOT).stdout.strip()
                assert clone_head == root_head, f"{where}: the clone is at {clone_head}, HEAD is {root_head}"
                after_first = {"git": _stat(home / ".git"), "HEAD": _stat(home / ".git" / "HEAD"),
                               "package": _stat(package)}
                request.node.user_properties.append(("first_install_s", round(dt, 1)))
            else:  # neither cloned nor installed again
                now = {"git": _stat(home / ".git"), "HEAD": _stat(home / ".git" / "HEAD"), "package": _stat(package)}
                changed = [{"git": "re-cloned", "HEAD": "re-cloned", "package": "re-installed compinv_utils"}[k]
                           for k in now if now[k] != after_first[k]]
                assert not changed, f"{where}: the setup cell {' and '.join(sorted(set(changed)))} (inode, mtime " \
                                    f"{after_first} -> {now}); after the first chapter it must reuse both"
    # A regular install, not an editable one: no .pth or editable finder that points at a source tree.
    for pth in site.glob("*.pth"):
        text = pth.read_text(errors="replace")
        assert str(home) not in text and str(ROOT) not in text and "compinv" not in pth.name, \
            f"{pth.name} in site-packages points at a source tree: compinv_utils must be a regular install"
    for direct in site.glob("compinv_utils-*.dist-info/direct_url.json"):
        assert not json.loads(direct.read_text()).get("dir_info", {}).get("editable"), f"{direct}: editable"
    torch_now = _run([str(py), "-c", "import torch; print(torch.__version__)"], 120, env=env, cwd=content)
    assert torch_now.stdout.strip().split("+")[0] == TORCH.split("==")[1], \
        f"installing the package replaced Colab's preinstalled torch: {torch_now.stdout} {torch_now.stderr}"

    rounds = [sum(t[k] for t in timings.values()) for k in (0, 1)]
    request.node.user_properties.append(("setup_cell_seconds", json.dumps(timings)))
    print(f"\nvenv + wheel cache {WHEELHOUSE} ({m['wheels']}): {m['wheels_s']:.0f} s; {TORCH}: {m['torch_s']:.0f} s; "
          f"first setup cell (clone + pip install + load): "
          f"{timings[next(iter(cells))][0]:.0f} s; round 1: {rounds[0]:.0f} s; round 2: {rounds[1]:.0f} s")
    for name, (t1, t2) in timings.items():
        print(f"  {name}: {t1:.1f} s, {t2:.1f} s")
