"""The rendered site (`make site`): it builds without a warning, and a chapter shows its figures.

The build runs the Makefile's own arguments (SITE_ARGS) into a temporary folder; the browser half
opens chapter 01 in headless Chromium (Debian's chromium and chromium-driver, which .ci/run
installs) and checks that every figure from the notebook's outputs loaded. Without the browser the browser half
is skipped with a message, except in CI (``CI`` set), where it fails.
"""

import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = (
    "the browser test needs Debian's Chromium and its driver: "
    "sudo apt-get update && sudo apt-get install -y chromium chromium-driver "
    "(.ci/run does this in CI)"
)
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1024",
]


def site_args() -> list[str]:
    """The sphinx arguments of `make site` (SITE_ARGS in the Makefile), without the output folder."""
    m = re.search(r"^SITE_ARGS\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "the Makefile defines SITE_ARGS for `make site`"
    return shlex.split(m.group(1))


def build_site(out: Path) -> subprocess.CompletedProcess:
    """`make site` into `out`: python -m sphinx $(SITE_ARGS) out, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "sphinx", *site_args(), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def chapter(prefix: str) -> Path:
    found = sorted((REPO / "notebooks").glob(f"{prefix}_*.ipynb"))
    assert found, f"no notebooks/{prefix}_*.ipynb"
    return found[0]


def notebook_title(nb: Path) -> str:
    """The notebook's first level-1 heading, as plain text (markdown emphasis and code marks dropped)."""
    for cell in json.loads(nb.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    # Outside `code` spans drop the emphasis marks; inside, keep the text as it is.
                    parts = line[2:].split("`")
                    text = "".join(p if i % 2 else re.sub(r"(\*\*|__|\*|_)(\S.*?)\1", r"\2", p)
                                   for i, p in enumerate(parts))
                    return " ".join(text.split())
    raise AssertionError(f"{nb.name} has no '# ' title")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "html"
    return out, build_site(out)


def test_site_builds_without_warnings(site):
    out, proc = site
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    assert (out / "index.html").is_file() and (out / "docs" / "index.html").is_file()
    for nb in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        assert (out / "notebooks" / f"{nb.stem}.html").is_file(), nb.name
    start = (out / "docs" / "index.html").read_text()
    assert "https://arxiv.org/abs/2312.08048" in start
    assert "https://github.com/zhangxulu1996/Compositional-Inversion" in start


@pytest.fixture
def served(site):
    out, proc = site
    assert proc.returncode == 0, "the site did not build"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def chromium(profile: Path):
    """Headless Chromium through Debian's chromedriver (never a downloaded one), a fresh profile."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        message = f"{', '.join(missing)} missing: {INSTALL_HINT}"
        if os.environ.get("CI"):  # CI installs the browser, so there its absence is a failure
            pytest.fail(message, pytrace=False)
        pytest.skip(message + " (skipped outside CI)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: make install (it installs the 'docs' extra)", pytrace=False)

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # The pages ask a CDN for MathJax, which a closed network refuses; figures must not wait on it.
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chapter_page_shows_its_figures(served, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    nb = chapter("01")
    # Figures from the notebook's outputs: myst-nb puts them in the cells' output areas.
    images_js = """
        return Array.from(document.querySelectorAll('.cell_output img')).map(
            i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}));
    """
    with chromium(tmp_path / "chromium-profile") as browser:
        browser.get(f"{served}/notebooks/{nb.stem}.html")
        try:  # every image done (loaded or broken); if not in time, the checks below name them
            WebDriverWait(browser, 30).until(
                lambda d: (imgs := d.execute_script(images_js)) and all(i["complete"] for i in imgs)
            )
        except TimeoutException:
            pass
        images = browser.execute_script(images_js)
        headings = [h.text.rstrip("#¶ ").strip() for h in browser.find_elements(By.TAG_NAME, "h1")]
        page_title = browser.title

    assert len(images) >= 3, f"{nb.name}: expected at least 3 figures on the page, found {images}"
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"figures that did not load: {broken}"
    remote = [i["src"] for i in images if "://" in i["src"]]
    assert not remote, f"figures must be local files: {remote}"

    title = notebook_title(nb)
    assert title in headings, f"heading {title!r} not among the page's h1 {headings}"
    assert title in page_title, f"page title {page_title!r} lacks {title!r}"
