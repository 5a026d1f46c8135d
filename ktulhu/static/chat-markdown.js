// Replies as Markdown: marked (parse) -> DOMPurify (sanitise) -> a DOM morph into the bubble.
//
// Safety: raw HTML in a reply is shown as text (the `html` renderer escapes it), images become links
// (nothing is loaded from elsewhere), and whatever marked and highlight.js produce is sanitised by
// DOMPurify with a short allow-list before it reaches the page; links open in a new tab with
// rel="noopener noreferrer nofollow", and `javascript:` and other unsafe URLs are dropped.
//
// Streaming: each update re-renders the whole reply, then `morph` changes only the nodes that
// differ, so finished paragraphs and code blocks keep their DOM nodes (no flicker, text selection
// and the copy buttons survive). An unclosed ``` fence renders as a code block up to the end.
// Code in a fence with a known language is highlighted as it streams; unlabelled code is
// auto-detected once the reply is complete (auto-detection tries every language).
"use strict";

(function () {
  const marked = window.marked;
  const DOMPurify = window.DOMPurify;
  const hljs = window.hljs;

  const ALLOWED_TAGS = ["a", "b", "blockquote", "br", "button", "code", "del", "div", "em", "h1", "h2", "h3",
    "h4", "h5", "h6", "hr", "i", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table", "tbody",
    "td", "tfoot", "th", "thead", "tr", "ul"];
  const ALLOWED_ATTR = ["href", "title", "class", "type", "aria-label", "start", "align"];
  const AUTO_DETECT_MAX = 20000;
  const CACHE_MAX = 200;

  let labels = { copy: "Copy", copyCode: "Copy the code", code: "code" };
  let streaming = false;
  const cache = new Map();  // language + code -> highlighted HTML (finished blocks are not redone)

  function escape(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  function highlighted(code, language) {
    const key = language + "\u0000" + code;
    if (cache.has(key)) return cache.get(key);
    let result;
    if (language) {
      result = { html: hljs.highlight(code, { language, ignoreIllegals: true }).value, language };
    } else if (!streaming && code.length <= AUTO_DETECT_MAX) {
      const auto = hljs.highlightAuto(code);
      result = { html: auto.value, language: auto.language || "" };
    } else {
      return { html: escape(code), language: "" };  // not cached: detected once the reply is complete
    }
    if (cache.size >= CACHE_MAX) cache.delete(cache.keys().next().value);
    cache.set(key, result);
    return result;
  }

  const parser = new marked.Marked({ gfm: true, breaks: true, async: false });
  parser.use({
    renderer: {
      html(token) {  // raw HTML is shown, never interpreted
        const text = escape(token.text);
        return token.block ? "<p>" + text + "</p>\n" : text;
      },
      image(token) {  // no remote images: a link to it instead
        const label = token.text || token.href || "";
        return '<a href="' + escape(token.href || "") + '">' + escape(label) + "</a>";
      },
      checkbox(token) {
        return token.checked ? "☑ " : "☐ ";
      },
      code(token) {
        const info = String(token.lang || "").trim().split(/\s+/)[0].replace(/[^A-Za-z0-9_+#.-]/g, "").slice(0, 32);
        const known = info && hljs && hljs.getLanguage(info) ? info.toLowerCase() : "";
        const code = String(token.text || "").replace(/\n$/, "");
        const result = hljs ? highlighted(code, known) : { html: escape(code), language: "" };
        const shown = info || result.language || labels.code;
        const cls = "hljs" + (result.language ? " language-" + result.language.replace(/[^a-z0-9_+-]/gi, "") : "");
        return '<div class="code-block"><div class="code-head"><span class="code-lang">' + escape(shown) +
          '</span><button type="button" class="copy-code" aria-label="' + escape(labels.copyCode) + '">' +
          escape(labels.copy) + '</button></div><pre><code class="' + cls + '">' + result.html + "</code></pre></div>\n";
      },
    },
  });

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      if (node.getAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    } else if (node.tagName === "BUTTON") {
      node.setAttribute("type", "button");
    }
  });

  function sanitise(html) {
    return DOMPurify.sanitize(html, {
      ALLOWED_TAGS, ALLOWED_ATTR, ALLOW_DATA_ATTR: false, ALLOW_ARIA_ATTR: false, RETURN_DOM_FRAGMENT: true,
    });
  }

  function syncAttributes(target, source) {
    for (const { name } of Array.from(target.attributes)) {
      if (!source.hasAttribute(name)) target.removeAttribute(name);
    }
    for (const { name, value } of Array.from(source.attributes)) {
      if (target.getAttribute(name) !== value) target.setAttribute(name, value);
    }
  }

  // Make `target`'s children equal to `source`'s, reusing every node that is already right.
  function morph(target, source) {
    let current = target.firstChild;
    for (const node of Array.from(source.childNodes)) {
      if (!current) {
        target.appendChild(node);
        continue;
      }
      if (current.nodeType !== node.nodeType || current.nodeName !== node.nodeName) {
        target.replaceChild(node, current);
        current = node.nextSibling;
        continue;
      }
      if (node.nodeType === Node.ELEMENT_NODE) {
        syncAttributes(current, node);
        morph(current, node);
      } else if (current.nodeValue !== node.nodeValue) {
        current.nodeValue = node.nodeValue;
      }
      current = current.nextSibling;
    }
    while (current) {
      const next = current.nextSibling;
      target.removeChild(current);
      current = next;
    }
  }

  // Render `text` into `container`. `live`: the reply is still streaming.
  function render(container, text, live) {
    streaming = Boolean(live);
    try {
      morph(container, sanitise(parser.parse(String(text || ""))));
    } finally {
      streaming = false;
    }
  }

  function setLabels(next) {
    labels = Object.assign({}, labels, next);
  }

  window.KtulhuMarkdown = Object.freeze({ render, setLabels, morph, sanitise });
})();
