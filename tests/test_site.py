"""The rendered site (`make site`): it builds without a warning, works offline, and a chapter shows its
figures and typesets its equations.

The build runs the Makefile's own arguments (SITE_ARGS) into a temporary folder. Without a browser, the built
pages are read: no page loads a script, style sheet or image from the network (MathJax and the Colab badge are
local copies). The browser half serves the site from a local HTTP server to headless Chromium (Debian's
chromium and chromium-driver, which .ci/run installs), whose resolver answers no host but 127.0.0.1, opens
chapter 01 and checks that every figure from the notebook's outputs loaded, and opens the first chapter with
math and checks that MathJax typeset it. Without the browser the browser half is skipped with a message,
except in CI (``CI`` set), where it fails.
"""

import contextlib
import functools
import html.parser
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
    # Offline: every host name but the local server's address fails to resolve, as on a closed network.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
# Rendered math, whichever MathJax renders it: 2 (.MathJax, .MathJax_Display), 3 and 4 (mjx-container).
TYPESET = ".MathJax, .MathJax_Display, .MathJax_SVG, mjx-container"


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


class RemoteResources(html.parser.HTMLParser):
    """What a page would fetch from another host: script, style sheet, image and frame addresses."""

    ATTRS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "link": "href"}

    def __init__(self):
        super().__init__()
        self.remote: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "link" and not {"stylesheet", "preload", "icon", "modulepreload"} & set((a.get("rel") or "").split()):
            return  # navigation links (next, prev, canonical) fetch nothing
        url = a.get(self.ATTRS.get(tag, ""), "") or ""
        if re.match(r"^(https?:)?//", url.strip(), re.I):
            self.remote.append(f"<{tag} {self.ATTRS[tag]}={url!r}>")


def test_site_pages_fetch_nothing_from_the_network(site):
    out, proc = site
    assert proc.returncode == 0, "the site did not build"
    remote = {}
    for page in sorted(out.rglob("*.html")):
        parser = RemoteResources()
        parser.feed(page.read_text(encoding="utf-8"))
        if parser.remote:
            remote[str(page.relative_to(out))] = parser.remote
    assert not remote, f"pages that load from the network: {remote}"
    styles = [str(css.relative_to(out)) for css in sorted((out / "_static").rglob("*.css"))
              if re.search(r"(url\(\s*[\"']?|@import\s+[\"']?)(https?:)?//", css.read_text(errors="replace"))]
    assert not styles, f"style sheets that load from the network: {styles}"
    # MathJax is served from the site itself, and pages with math load it.
    assert (out / "_static" / "mathjax" / "MathJax.js").is_file(), "no _static/mathjax/MathJax.js in the site"
    math_pages = [p for p in sorted((out / "notebooks").glob("*.html")) if 'class="math' in p.read_text()]
    assert math_pages, "no chapter page has math"
    for page in math_pages:
        assert "_static/mathjax/MathJax.js" in page.read_text(), f"{page.name} has math but does not load MathJax"
    # The Colab badge is a local image (the notebooks keep Colab's own address for GitHub and Colab).
    for nb in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        if "colab-badge.svg" in nb.read_text(encoding="utf-8"):
            page = (out / "notebooks" / f"{nb.stem}.html").read_text(encoding="utf-8")
            badges = re.findall(r'<img[^>]*src="([^"]*colab-badge[^"]*)"', page)
            assert badges, f"{nb.stem}.html shows no Colab badge"
            for src in badges:
                assert (out / "notebooks" / src).resolve().is_file(), f"{nb.stem}.html: badge {src} is not in the site"


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


def math_chapter(out: Path) -> Path:
    r"""The first chapter whose rendered page has inline math (Sphinx writes it as \(...\) in span.math)."""
    for nb in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        page = out / "notebooks" / f"{nb.stem}.html"
        if page.is_file() and '<span class="math' in page.read_text(encoding="utf-8"):
            return nb
    raise AssertionError("no chapter has inline math ($...$ in a markdown cell)")


def test_chapter_equations_are_typeset_offline(site, served, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    nb = math_chapter(site[0])
    # Sphinx's math elements (span.math inline, div.math displayed); per element: rendered or not, and the
    # text left outside MathJax's own elements (MathJax 2 keeps the TeX in a <script type="math/tex">) and
    # the equation number.
    math_js = """
        const typeset = arguments[0];
        return Array.from(document.querySelectorAll('span.math.notranslate, div.math.notranslate')).map(e => {
            const bare = e.cloneNode(true);
            bare.querySelectorAll('script, .eqno, .MathJax_Preview, ' + typeset).forEach(x => x.remove());
            return {rendered: !!e.querySelector(typeset), left: bare.textContent.trim(), tag: e.tagName};
        });
    """
    paragraph_js = """
        const inline = document.querySelector('p span.math.notranslate');
        if (!inline) return '';
        const p = inline.closest('p').cloneNode(true);
        p.querySelectorAll('script, .MathJax_Preview').forEach(x => x.remove());
        return p.textContent;
    """
    with chromium(tmp_path / "chromium-profile") as browser:
        browser.get(f"{served}/notebooks/{nb.stem}.html")
        try:  # every math element rendered; if not in time, the checks below name the ones left
            WebDriverWait(browser, 30).until(
                lambda d: (m := d.execute_script(math_js, TYPESET)) and all(x["rendered"] for x in m)
            )
        except TimeoutException:
            pass
        maths = browser.execute_script(math_js, TYPESET)
        paragraph = browser.execute_script(paragraph_js)
        mathjax = browser.execute_script("return window.MathJax ? (MathJax.version || 'loaded') : null")
        errors = browser.execute_script(
            "return document.querySelectorAll('.MathJax_Error, .merror, mjx-merror').length")

    assert mathjax, f"{nb.stem}.html: MathJax did not load (it should come from the site's _static/mathjax)"
    assert any(m["tag"] == "SPAN" for m in maths), f"{nb.stem}.html: no inline math on the page"
    raw = [m["left"] for m in maths if not m["rendered"] or m["left"]]
    assert not raw, f"{nb.stem}.html: equations left as raw TeX: {raw[:5]}"
    assert not re.search(r"\\[(\[]", paragraph), f"{nb.stem}.html: raw TeX in a paragraph: {paragraph[:300]!r}"
    assert errors == 0, f"{nb.stem}.html: MathJax reported {errors} TeX errors"
