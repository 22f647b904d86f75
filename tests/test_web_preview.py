"""web/lynx_preview.js outside a browser: node runs the extension against stand-ins for the
front-end (app, api, document, canvas) to check what it asks the front-end for.

The front-end draws a DOM widget inset by a 10 px margin on every side (ComfyUI_frontend
src/scripts/domWidget.ts), so a slot of height h shows h - 20 px of the element.
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs node (Node.js) to run the front-end module")

APP_STUB = """
export const app = { extensions: [], registerExtension(e) { this.extensions.push(e); }, graph: null };
"""
API_STUB = "export const api = { apiURL: (p) => p };\n"

# A fake DOM and node; the canvas measures 6 px per character (a 12 px sans-serif is about that).
DRIVER = r"""
const el = () => ({ style: {}, dataset: {}, textContent: "", className: "", children: [],
  appendChild(c) { this.children.push(c); }, addEventListener() {}, remove() {} });
globalThis.document = {
  getElementById: () => null, head: el(),
  createElement: (tag) => tag === "canvas"
    ? { getContext: () => ({ font: "", measureText: (t) => ({ width: 6 * t.length }) }) }
    : el(),
};
const { app } = await import("./scripts/app.js");
const mod = await import("./a/b/lynx_preview.js");
const ext = app.extensions[0];
await ext.setup();
class FaceNode {
  constructor(width) { this.size = [width, 120]; this.widgets = []; }
  addDOMWidget(name, type, element, options) { const w = { name, element, options }; this.widgets.push(w); return w; }
  computeSize() { return [this.size[0], 60 + this.widgets.reduce((h, w) => h + w.options.getMinHeight(), 0)]; }
  setSize(s) { this.size = s; }
}
await ext.beforeRegisterNodeDef(FaceNode, { name: "LynxEncodeFaceID" });
const out = {};
for (const [label, width, text] of JSON.parse(process.argv[2])) {
  const node = new FaceNode(width);
  node.onExecuted({ lynx_faces: [text] });
  const w = node.widgets[0];
  out[label] = { slot: w.options.getMinHeight(), margin: w.options.margin, text: w.element.textContent,
                 nodeHeight: node.size[1], serialize: w.serialize };
}
out.wrapped = mod.wrappedLineCount("aaaa bbbb cccc", 54, (t) => 6 * t.length);
out.long = mod.wrappedLineCount("x".repeat(25), 60, (t) => 6 * t.length);
console.log(JSON.stringify(out));
"""

SUMMARY = "Identity from 1 face(s) in 1 image(s).\nRan on: CPUExecutionProvider"


def _run(tmp_path, cases):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(APP_STUB)
    (tmp_path / "scripts" / "api.js").write_text(API_STUB)
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(ROOT / "web" / "lynx_preview.js", tmp_path / "a" / "b" / "lynx_preview.js")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "driver.js").write_text(DRIVER)
    proc = subprocess.run([NODE, "driver.js", json.dumps(cases)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _visible_lines(slot, margin):
    """Lines of 16 px (plus 2 px padding above and below) that fit in what the front-end shows."""
    return (slot - 2 * margin - 4) // 16


def test_face_caption_slot_shows_every_line(tmp_path):
    # 340 px node: each summary line fits on one line -> 2 lines; 150 px: the first line wraps
    got = _run(tmp_path, [["wide", 340, SUMMARY], ["narrow", 150, SUMMARY], ["one", 340, "No identity."]])
    assert got["wide"]["margin"] == 10 and got["wide"]["text"] == SUMMARY
    assert _visible_lines(got["wide"]["slot"], 10) == 2
    assert _visible_lines(got["one"]["slot"], 10) == 1
    inner = 150 - 20 - 12  # node width minus the margins and the caption's padding
    first_line_px = 6 * len(SUMMARY.split("\n")[0])
    assert first_line_px > inner and _visible_lines(got["narrow"]["slot"], 10) >= 3
    # the node grew to hold the caption, and the caption is never saved in the workflow
    assert got["wide"]["nodeHeight"] >= 60 + got["wide"]["slot"] and got["wide"]["serialize"] is False


def test_word_wrap_counts_like_the_css(tmp_path):
    got = _run(tmp_path, [])
    assert got["wrapped"] == 2  # "aaaa bbbb" is 54 px, "cccc" goes to line 2
    assert got["long"] == 3     # 150 px of one word in 60 px: broken anywhere (overflow-wrap)
