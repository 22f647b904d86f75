// ComfyUI-Lynx front-end: the video preview on "Lynx Video Combine" and the face caption on
// "Lynx Encode Face ID". Served from the pack's WEB_DIRECTORY as /extensions/<pack>/lynx_preview.js,
// so the front-end's module shims are two folders up.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const VIDEO_NODE = "LynxVideoCombine";
const FACE_NODE = "LynxEncodeFaceID";
const TRAIN_NODE = "LynxTrainAdapters";
const VIDEO_WIDGET = "lynx_video_preview";
const CAPTION_WIDGET = "lynx_face_caption";
const VIDEO_EXTS = ["mp4", "webm", "mov", "mkv"];

// The front-end draws a DOM widget inside its slot inset by a margin on every side (10 px unless the
// widget says otherwise), so a slot of height h shows only h - 2 * margin of the element. The
// caption's slot is sized from its text laid out the way the CSS below lays it out.
const DOM_MARGIN = 10;
const CAPTION_FONT = "12px sans-serif";
const CAPTION_LINE = 16;   // px, the caption's CSS line-height
const CAPTION_PAD_X = 6;   // px, left and right padding
const CAPTION_PAD_Y = 2;   // px, top and bottom padding

function injectStyle() {
  if (document.getElementById("lynx-preview-style")) return;
  const style = document.createElement("style");
  style.id = "lynx-preview-style";
  style.textContent = `
    .lynx-video-preview { width: 100%; height: 100%; display: flex; align-items: center;
      justify-content: center; overflow: hidden; }
    .lynx-video-preview video, .lynx-video-preview img { width: 100%; height: 100%;
      object-fit: contain; border-radius: 4px; }
    .lynx-face-caption { font: ${CAPTION_FONT}; line-height: ${CAPTION_LINE}px;
      color: var(--input-text, #ddd); padding: ${CAPTION_PAD_Y}px ${CAPTION_PAD_X}px; box-sizing: border-box;
      white-space: pre-wrap; overflow-wrap: anywhere; overflow: hidden; }
  `;
  document.head.appendChild(style);
}

function viewUrl(file) {
  const params = new URLSearchParams({
    filename: file.filename,
    subfolder: file.subfolder ?? "",
    type: file.type ?? "output",
  });
  // The same file name can be rewritten by a later run: never let the browser reuse the old one.
  const rand = typeof app.getRandParam === "function" ? app.getRandParam() : `&rand=${Math.random()}`;
  return api.apiURL(`/view?${params}${rand}`);
}

function extensionOf(file) {
  const name = String(file.filename ?? "").toLowerCase();
  const dot = name.lastIndexOf(".");
  return dot >= 0 ? name.slice(dot + 1) : String(file.format ?? "");
}

// A DOM widget that is never saved in widgets_values nor sent in the API prompt.
function addPreviewWidget(node, name, element, options) {
  const widget = node.addDOMWidget(name, "preview", element, {
    serialize: false,
    hideOnZoom: false,
    ...options,
  });
  widget.serialize = false;
  return widget;
}

function fitNode(node) {
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

function showVideo(node, file) {
  let state = node.lynxVideo;
  if (!state) {
    const box = document.createElement("div");
    box.className = "lynx-video-preview";
    state = node.lynxVideo = { box, aspect: 9 / 16, media: null };
    state.widget = addPreviewWidget(node, VIDEO_WIDGET, box, {
      margin: DOM_MARGIN,
      // the element is the slot minus the margins: give the video its aspect inside that
      getMinHeight: () => Math.max(64, Math.round((node.size[0] - 2 * DOM_MARGIN) * state.aspect) + 2 * DOM_MARGIN),
    });
  }
  const ext = extensionOf(file);
  const isVideo = VIDEO_EXTS.includes(ext);
  const tag = isVideo ? "VIDEO" : "IMG";
  if (!state.media || state.media.tagName !== tag) {
    state.media?.remove();
    state.media = document.createElement(tag.toLowerCase());
    if (isVideo) {
      Object.assign(state.media, { controls: true, loop: true, muted: true, autoplay: true, playsInline: true });
      state.media.addEventListener("loadedmetadata", () => {
        if (state.media.videoWidth) state.aspect = state.media.videoHeight / state.media.videoWidth;
        fitNode(node);
      });
    } else {
      state.media.addEventListener("load", () => {
        if (state.media.naturalWidth) state.aspect = state.media.naturalHeight / state.media.naturalWidth;
        fitNode(node);
      });
    }
    state.media.addEventListener("error", () => {
      state.box.dataset.lynxError = isVideo ? "this browser cannot play the file" : "the image did not load";
      state.box.title = `${file.filename}: ${state.box.dataset.lynxError}`;
    });
    state.box.appendChild(state.media);
  }
  delete state.box.dataset.lynxError;
  state.box.dataset.lynxFile = file.filename;
  state.box.title = `${file.subfolder ? file.subfolder + "/" : ""}${file.filename}` +
    (file.frame_rate ? ` (${file.frame_rate} fps)` : "");
  state.media.src = viewUrl(file);
  fitNode(node);
}

let measureCtx = null;

function textWidth(text) {
  if (!measureCtx) {
    measureCtx = document.createElement("canvas").getContext("2d");
  }
  if (!measureCtx) return text.length * 7; // no canvas: a generous guess for a 12 px font
  measureCtx.font = CAPTION_FONT;
  return measureCtx.measureText(text).width;
}

// Visual lines of `text` in a box `width` px wide: explicit line breaks plus word wrapping (a word
// longer than a line breaks anywhere, as overflow-wrap: anywhere does).
export function wrappedLineCount(text, width, measure = textWidth) {
  let count = 0;
  for (const paragraph of String(text).split("\n")) {
    let lines = 1;
    let used = 0;
    for (const word of paragraph.split(/(\s+)/).filter((w) => w.length)) {
      const w = measure(word);
      if (used + w <= width || (used === 0 && w <= width)) {
        used += w;
      } else if (/^\s+$/.test(word)) {
        used = width; // a space at the end of a line: the next word starts a new line
      } else {
        lines += used > 0 ? 1 : 0;
        used = w;
        while (used > width) {
          lines += 1;
          used -= width;
        }
      }
    }
    count += lines;
  }
  return count;
}

// Slot height that shows every line of the caption in a node `nodeWidth` px wide.
export function captionSlotHeight(text, nodeWidth, measure = textWidth) {
  const inner = Math.max(20, nodeWidth - 2 * DOM_MARGIN - 2 * CAPTION_PAD_X);
  return 2 * DOM_MARGIN + 2 * CAPTION_PAD_Y + CAPTION_LINE * wrappedLineCount(text, inner, measure);
}

function showFaceCaption(node, lines) {
  let el = node.lynxCaption;
  if (!el) {
    el = node.lynxCaption = document.createElement("div");
    el.className = "lynx-face-caption";
    addPreviewWidget(node, CAPTION_WIDGET, el, {
      margin: DOM_MARGIN,
      getMinHeight: () => captionSlotHeight(el.textContent, node.size[0]),
    });
  }
  el.textContent = lines.join("\n");
  fitNode(node);
}

function dropProgressPreviews(node) {
  const previews = app.nodePreviewImages;
  const key = String(node.id);
  if (!previews || !previews[key]) return;
  for (const url of previews[key]) {
    if (typeof url === "string" && url.startsWith("blob:")) URL.revokeObjectURL(url);
  }
  delete previews[key];
  node.imgs = undefined;  // re-read from the node's outputs on the next draw
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ComfyUI-Lynx.preview",

  async setup() {
    injectStyle();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === VIDEO_NODE) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const videos = message?.videos;
        if (Array.isArray(videos) && videos.length) showVideo(this, videos[0]);
      };
    } else if (nodeData.name === TRAIN_NODE) {
      // The x0 previews of a run arrive as progress previews, which the front-end keeps on the node
      // until it runs again and draws over the node's own output: drop them once the run's loss
      // plot arrives, so the plot shows.
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        dropProgressPreviews(this);
        onExecuted?.apply(this, arguments);
      };
    } else if (nodeData.name === FACE_NODE) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const faces = message?.lynx_faces;
        if (faces != null) showFaceCaption(this, (Array.isArray(faces) ? faces : [faces]).map(String));
      };
    }
  },
});
