"""The study report page in headless Chromium: it renders from file:// with no console error, no failed
request and no request outside the page's folder, and its plots and contact sheet are there.

Needs no ComfyUI (the report is a file); skips without Chromium (`apt-get install -y chromium`, or
LYNX_CHROMIUM=/path/to/chrome). Every host name resolves to nothing (--host-resolver-rules), so the
page cannot reach the network even if it tried; a try would show up as a failed request.
LYNX_E2E_SCREENSHOTS=DIR keeps the screenshot.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import tests.e2e.test_web_e2e as web
from lynx_batch.study.compare import write_comparison
from lynx_batch.study.report import write_report
from tests.test_study_report import make_study

OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND"]


class OfflineBrowser(web.Browser):
    """The DevTools driver of test_web_e2e, also recording every request and every failed one."""

    def __init__(self, exe: str) -> None:
        self.requests: list[str] = []
        self.failed: list[str] = []
        super().__init__(exe)
        self.send("Network.enable")
        self.send("Log.enable")

    def _event(self, msg: dict) -> None:
        method = msg.get("method")
        if method == "Network.requestWillBeSent":
            self.requests.append(msg["params"]["request"]["url"])
        elif method == "Network.loadingFailed":
            self.failed.append(f"{msg['params'].get('errorText')} {msg['params'].get('blockedReason', '')}")
        elif method == "Log.entryAdded" and msg["params"]["entry"]["level"] in ("error", "warning"):
            e = msg["params"]["entry"]
            self.console.append(f"log {e['level']}: {e.get('text')} {e.get('url', '')}")
        else:
            super()._event(msg)


@pytest.fixture(scope="module")
def browser():
    exe = web._chromium()
    if exe is None:
        pytest.skip("no Chromium: `apt-get install -y chromium` (or set LYNX_CHROMIUM)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(web, "CHROMIUM_FLAGS", web.CHROMIUM_FLAGS + OFFLINE_FLAGS)
        b = OfflineBrowser(exe)
    try:
        yield b
    finally:
        b.close()


def _open(browser: OfflineBrowser, path: Path) -> None:
    browser.requests.clear()
    browser.failed.clear()
    browser.console.clear()
    browser.send("Page.navigate", url=path.as_uri())
    browser.wait("document.readyState === 'complete' && document.documentElement.dataset.reportReady === '1'",
                 60, f"{path.name} to load")
    # lazy pictures: scroll through the page so every contact sheet loads
    browser.eval("(async () => { for (const img of document.images) { img.scrollIntoView(); "
                 "await new Promise(r => setTimeout(r, 20)); } window.scrollTo(0, 0); return true; })()")
    browser.wait("Array.from(document.images).every(i => i.complete)", 30, "the pictures")


def _check_clean(browser: OfflineBrowser, folder: Path) -> None:
    assert browser.console == [], browser.console
    assert browser.failed == [], browser.failed
    outside = [u for u in browser.requests if not (u.startswith(folder.as_uri() + "/") or u.startswith("data:"))]
    assert outside == [], outside


def test_report_renders_offline_with_plots(browser, tmp_path):
    study = make_study(tmp_path)
    html = write_report(study)["html"]
    _open(browser, html)
    _check_clean(browser, html.parent)
    state = browser.eval("""(() => {
        const kinds = {};
        document.querySelectorAll('svg.plot').forEach(s => { kinds[s.dataset.kind] = (kinds[s.dataset.kind] || 0) + 1; });
        return {kinds,
                means: document.querySelectorAll('svg.plot[data-kind="settings"] circle.mean').length,
                imgs: Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight]),
                rows: document.querySelectorAll('#videos tbody tr').length,
                scripts: document.querySelectorAll('script').length,
                hostile: document.body.innerText.includes('<script>alert("x")</script>'),
                title: document.title};
    })()""")
    assert state["kinds"] == {"settings": 2, "subjects": 2, "frames": 2, "missing": 2}, state
    assert state["means"] == 4  # 2 settings x 2 evaluators
    assert len(state["imgs"]) == 6 and all(w > 0 and h == 96 for w, h in state["imgs"]), state["imgs"]
    assert state["rows"] == 12 and state["scripts"] == 1
    assert state["hostile"]  # shown as text, never run
    # the table sorts when its heading is clicked (our script runs without errors)
    first = browser.eval("""(() => { const th = Array.from(document.querySelectorAll('#videos th'))
        .find(t => t.textContent === 'mean'); th.click(); th.click();
        return document.querySelector('#videos tbody tr td:nth-child(8)').textContent; })()""")
    assert first == "0.8333"  # alice's s01 video, the highest mean
    assert browser.console == []
    shots = Path(tempfile.gettempdir()) / "lynx_study_report.png"
    browser.send("Emulation.setDeviceMetricsOverride", width=1400, height=2400, deviceScaleFactor=1, mobile=False)
    browser.screenshot(shots)
    assert shots.stat().st_size > 10_000


def test_comparison_renders_offline(browser, tmp_path):
    a = make_study(tmp_path, "study A", failed=False)
    b = make_study(tmp_path, "study B", failed=False)
    html = write_comparison(a, b, tmp_path / "cmp")["html"]
    _open(browser, html)
    _check_clean(browser, html.parent)
    n = browser.eval("document.querySelectorAll('svg.plot[data-kind=\"diff\"] circle.mean').length")
    assert n == 4
    assert json.loads(browser.eval("JSON.stringify(document.querySelectorAll('#comparison tbody tr').length)")) == 4
