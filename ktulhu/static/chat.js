// Ktulhu's built-in chat page: streams replies over /ws and renders them as Markdown
// (chat-markdown.js), keeps this browser's anonymous chats in localStorage and a signed-in user's
// chats on the server, renames and deletes chats, signs in and out.
//
// Text from people and the model reaches the page through textContent, or as Markdown through
// chat-markdown.js (sanitised, raw HTML shown as text). Other tabs of this browser hear of
// renames, deletions, new chats and sign-in/out on a BroadcastChannel; titles made or changed
// anywhere else arrive on /chat-summary/ws.
"use strict";

(function () {
  const I18N = window.KtulhuI18n;
  const MD = window.KtulhuMarkdown;
  const STORE_CHATS = "ktulhu.chats";
  const STORE_DEVICE = "ktulhu.device";
  const STORE_LANGUAGE = "ktulhu.language";
  const STORE_AUTH = "ktulhu.auth";
  const STORE_OAUTH = "ktulhu.oauth";
  const MAX_CHATS = 100;
  const MAX_TITLE = 200;
  const SAFE_ID = /^[A-Za-z0-9_-]{1,128}$/;
  const COMPLETE = new Set(["eos", "stop"]);
  // How a reply may end once the server took the prompt; any other `done.reason` before the first
  // token means the prompt was refused and nothing was stored.
  const TAKEN = new Set(["eos", "stop", "length", "cancelled"]);
  const SESSION_ERRORS = new Set(["invalid_token", "invalid_api_key", "user_not_found"]);

  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const sidebarEl = $("sidebar");
  const backdropEl = $("backdrop");
  const menuEl = $("menu");
  const messagesEl = $("messages");
  const chatsEl = $("chats");
  const chatsEmptyEl = $("chats-empty");
  const promptEl = $("prompt");
  const sendEl = $("send");
  const cancelEl = $("cancel");
  const languageEl = $("language");
  const titleEl = $("chat-title");
  const noticeEl = $("notice");
  const noticeTextEl = $("notice-text");
  const noticeSignInEl = $("notice-sign-in");
  const connEl = $("connection");
  const srStatusEl = $("sr-status");
  const dialogEl = $("auth-dialog");
  const maxPromptChars = parseInt(body.dataset.maxPromptChars, 10) || 32000;
  const providers = {
    google: { id: body.dataset.googleClientId || "", title: "Google", button: $("google-sign-in") },
    apple: { id: body.dataset.appleClientId || "", title: "Apple", button: $("apple-sign-in") },
  };

  // --- small helpers ---------------------------------------------------------------------------

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function load(key, fallback, storage) {
    try {
      const value = JSON.parse((storage || localStorage).getItem(key));
      return value === null ? fallback : value;
    } catch (e) { return fallback; }
  }
  function save(key, value, storage) {
    try {
      if (value === null) (storage || localStorage).removeItem(key);
      else (storage || localStorage).setItem(key, JSON.stringify(value));
    } catch (e) { /* private mode: keep in memory */ }
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children || []) if (child) node.append(child);
    return node;
  }

  // --- language ---------------------------------------------------------------------------------

  function initialLanguage() {
    const saved = load(STORE_LANGUAGE, null);
    if (I18N.languages.includes(saved)) return saved;
    const browser = String(navigator.language || "en").slice(0, 2).toLowerCase();
    return I18N.languages.includes(browser) ? browser : "en";
  }
  let language = initialLanguage();
  const t = (key, vars) => I18N.t(language, key, vars);

  function applyLanguage() {
    document.documentElement.lang = language;
    if (languageEl.value !== language) languageEl.value = language;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-placeholder]")) node.placeholder = t(node.dataset.i18nPlaceholder);
    for (const node of document.querySelectorAll("[data-i18n-aria-label]")) node.setAttribute("aria-label", t(node.dataset.i18nAriaLabel));
    MD.setLabels({ copy: t("copy"), copyCode: t("copy_code"), code: t("code") });
    setAuthMode(authMode);
    renderAccount();
    renderChats();
    showConnection(connEl.dataset.state);
    for (const bubble of messagesEl.querySelectorAll(".msg.assistant")) {
      if (bubble !== (pending && pending.bubble)) renderAssistant(bubble, bubble.__text || "", false);
      showEnding(bubble, bubble.dataset.ending || "", bubble.__reason);
    }
  }

  // --- state ------------------------------------------------------------------------------------

  let deviceHash = load(STORE_DEVICE, null);
  if (typeof deviceHash !== "string" || !SAFE_ID.test(deviceHash)) {
    deviceHash = "web-" + uuid().replace(/-/g, "").slice(0, 24);
    save(STORE_DEVICE, deviceHash);
  }
  const sessionId = uuid();

  function loadAuth() {
    const value = load(STORE_AUTH, null);
    if (!value || typeof value.jwt !== "string" || typeof value.user_id !== "string") return null;
    return { jwt: value.jwt, user_id: value.user_id, email: typeof value.email === "string" ? value.email : null };
  }
  function loadLocalChats() {
    return load(STORE_CHATS, []).filter((c) => c && typeof c.id === "string" && SAFE_ID.test(c.id))
      .map((c) => ({ id: c.id, summary: typeof c.summary === "string" ? c.summary : null }));
  }

  let auth = loadAuth();
  let localChats = loadLocalChats();   // anonymous chats this browser made (their ids are their keys)
  let serverChats = [];                // a signed-in user's chats, from /chat-summary/last
  let chatId = null;
  let pending = null;                  // the prompt being answered
  let ws = null;
  let retry = 0;
  let summaryWs = null;
  let summaryRetry = 0;
  let authMode = "signin";
  const channel = "BroadcastChannel" in window ? new BroadcastChannel("ktulhu-chat") : null;

  function broadcast(message) { if (channel) channel.postMessage(message); }

  function visibleChats() {
    if (!auth) return localChats;
    const mine = new Set(serverChats.map((c) => c.id));
    return serverChats.concat(localChats.filter((c) => !mine.has(c.id)));
  }
  function chatEntry(id) { return serverChats.find((c) => c.id === id) || localChats.find((c) => c.id === id); }
  function saveLocal() { localChats = localChats.slice(0, MAX_CHATS); save(STORE_CHATS, localChats); }

  function addChat(id, summary, owned) {
    if (chatEntry(id)) return;
    const entry = { id, summary: summary || null };
    if (owned) serverChats.unshift(entry);
    else { localChats.unshift(entry); saveLocal(); }
    subscribe([id]);
    renderChats();
  }

  function dropChat(id) {
    serverChats = serverChats.filter((c) => c.id !== id);
    const before = localChats.length;
    localChats = localChats.filter((c) => c.id !== id);
    if (localChats.length !== before) saveLocal();
    renderChats();
  }

  function setSummary(id, text) {
    const entry = chatEntry(id);
    if (!entry || typeof text !== "string" || !text.trim()) return;
    entry.summary = text.trim().slice(0, MAX_TITLE);
    if (localChats.includes(entry)) saveLocal();
    renderChats();
  }

  // --- rendering --------------------------------------------------------------------------------

  function notice(text, options) {
    noticeTextEl.textContent = text || "";
    noticeEl.hidden = !text;
    noticeSignInEl.hidden = !(text && options && options.signIn && !auth);
  }

  function announce(text) {
    srStatusEl.textContent = "";
    if (text) window.setTimeout(() => { srStatusEl.textContent = text; }, 50);
  }

  function scrollDown() { messagesEl.scrollTop = messagesEl.scrollHeight; }

  function userBubble(text) {
    const node = el("div", { className: "msg user", dataset: { role: "user" }, text: text || "" });
    messagesEl.append(node);
    scrollDown();
    return node;
  }

  function assistantBubble() {
    const node = el("div", { className: "msg assistant", dataset: { role: "assistant" } },
      [el("div", { className: "md" })]);
    node.__text = "";
    messagesEl.append(node);
    scrollDown();
    return node;
  }

  function renderAssistant(bubble, text, live) {
    bubble.__text = text;
    MD.render(bubble.querySelector(".md"), text, live);
  }

  // The visible note on a reply that did not end normally; `ending` is length, cancelled,
  // interrupted or error ("" for a complete reply).
  function showEnding(bubble, ending, reason) {
    let note = bubble.querySelector(".ending");
    if (!ending) {
      delete bubble.dataset.ending;
      if (note) note.remove();
      return;
    }
    bubble.dataset.ending = ending;
    bubble.__reason = reason;
    const empty = !(bubble.__text || "").trim();
    const text = ending === "length" ? t("ended_length")
      : ending === "cancelled" ? t(empty ? "ended_cancelled_empty" : "ended_cancelled")
        : ending === "interrupted" ? t("ended_interrupted")
          : t("ended_error", { reason: reason || "error" });
    if (!note) {
      note = el("p", { className: "ending" });
      bubble.append(note);
    }
    note.textContent = text;
    bubble.classList.toggle("empty", empty);
  }

  function endingOfStored(message) {
    const meta = message.meta && typeof message.meta === "object" ? message.meta : {};
    const reason = typeof meta.finish_reason === "string" ? meta.finish_reason : "";
    if (meta.cancelled === true || reason === "cancelled" || reason === "shutting_down") return ["cancelled", reason];
    if (meta.incomplete === true || reason === "interrupted") return ["interrupted", reason];
    if (reason === "length") return ["length", reason];
    if (reason && !COMPLETE.has(reason)) return ["error", reason];
    return ["", reason];
  }

  function renderHistory(messages) {
    clear(messagesEl);
    let summary = null;
    for (const m of messages) {
      if (!m || typeof m !== "object") continue;
      if (m.role === "summary") { summary = m.text; continue; }
      if (m.role === "user") userBubble(m.text);
      else if (m.role === "assistant") {
        const bubble = assistantBubble();
        renderAssistant(bubble, m.text || "", false);
        const [ending, reason] = endingOfStored(m);
        showEnding(bubble, ending, reason);
      }
    }
    if (summary) setSummary(chatId, summary);
    scrollDown();
  }

  function chatTitle(entry) { return entry && entry.summary ? entry.summary : t("untitled"); }

  function renderChats() {
    const editing = chatsEl.querySelector(".rename-input");
    if (editing) return;  // do not pull the field from under the person typing; redrawn after
    clear(chatsEl);
    const list = visibleChats();
    for (const c of list) {
      const title = chatTitle(c);
      const li = el("li", { className: "chat-item", dataset: { chatId: c.id } }, [
        el("button", {
          type: "button", className: "chat-link" + (c.id === chatId ? " active" : ""), text: title,
          title, "aria-current": c.id === chatId ? "page" : null, dataset: { chatId: c.id },
          onclick: () => { closeDrawer(false); openChat(c.id); promptEl.focus(); },
        }),
        el("button", {
          type: "button", className: "icon-btn rename", text: "✎", title: t("rename"),
          "aria-label": t("rename_chat", { title }), onclick: () => startRename(c.id),
        }),
        el("button", {
          type: "button", className: "icon-btn delete", text: "✕", title: t("delete"),
          "aria-label": t("delete_chat", { title }), onclick: () => deleteChat(c.id),
        }),
      ]);
      chatsEl.append(li);
    }
    chatsEmptyEl.hidden = list.length > 0;
    const current = chatEntry(chatId);
    titleEl.textContent = current ? chatTitle(current) : t("new_chat");
  }

  function showConnection(state) {
    connEl.dataset.state = state;
    connEl.textContent = t(state === "online" ? "online" : state === "offline" ? "offline" : "connecting");
  }

  function locked(on) {
    sendEl.disabled = on;
    cancelEl.hidden = !on;
    promptEl.readOnly = on;
    if (on) delete body.dataset.idle;
    else body.dataset.idle = "1";
  }

  // --- REST -------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(method, path, payload, options) {
    const headers = { Accept: "application/json" };
    if (auth && !(options && options.anonymous)) headers.Authorization = "Bearer " + auth.jwt;
    if (payload !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: payload === undefined ? undefined : JSON.stringify(payload), credentials: "omit",
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const code = data && typeof data.error === "string" ? data.error : "http_" + response.status;
      const message = data && typeof data.message === "string" ? data.message : String(response.status);
      if (response.status === 401 && auth && SESSION_ERRORS.has(code)) sessionEnded();
      throw new ApiError(response.status, code, message);
    }
    return data;
  }

  async function fetchThread(id) {
    const data = await api("GET", "/chat-thread/" + encodeURIComponent(id));
    return data && Array.isArray(data.messages) ? data.messages : [];
  }

  async function loadServerChats() {
    if (!auth) { serverChats = []; renderChats(); return; }
    try {
      const data = await api("GET", "/chat-summary/last?limit=200");
      serverChats = (data.chats || []).filter((c) => c && typeof c.chat_id === "string" && SAFE_ID.test(c.chat_id))
        .map((c) => ({ id: c.chat_id, summary: typeof c.summary === "string" ? c.summary : null }));
    } catch (e) { /* keep what is shown; a session that ended was handled by api() */ }
    renderChats();
  }

  // --- chats ------------------------------------------------------------------------------------

  async function openChat(id) {
    if (pending) return;  // finish or stop the running reply first
    chatId = id;
    history.replaceState(null, "", "#chat=" + encodeURIComponent(id));
    renderChats();
    clear(messagesEl);
    notice("");
    register();
    const known = Boolean(chatEntry(id));
    try {
      const messages = await fetchThread(id);
      if (chatId !== id || pending) return;
      if (!messages.length && known) {  // listed here, gone on the server: deleted elsewhere
        forgetDeleted(id);
        return;
      }
      renderHistory(messages);
      if (messages.length && !known) {  // a chat opened from a link
        const summaries = messages.filter((m) => m.role === "summary");
        // a chat of the account is in its server list already: one opened from a link is anonymous
        addChat(id, summaries.length ? summaries[summaries.length - 1].text : null, false);
      }
    } catch (e) {
      if (chatId !== id) return;
      if (e.code === "chat_forbidden") notice(t("err_chat_forbidden"));
      else if (known) notice(t("history_unavailable", { reason: e.message }));
    }
  }

  function newChat() {
    if (pending) return;
    openChat(uuid());
  }

  // A chat that no longer exists: out of the sidebar, and out of view if it was open.
  function forgetDeleted(id) {
    dropChat(id);
    if (chatId === id && !pending) {
      newChat();
      notice(t("chat_deleted"));
    }
  }

  async function deleteChat(id) {
    const entry = chatEntry(id);
    if (!entry || (pending && pending.chatId === id)) return;
    if (!window.confirm(t("confirm_delete", { title: chatTitle(entry) }))) return;
    try {
      await api("DELETE", "/chat-thread/" + encodeURIComponent(id));
    } catch (e) {
      notice(t("delete_failed", { reason: e.code === "chat_forbidden" ? t("err_chat_forbidden") : e.message }));
      return;
    }
    broadcast({ type: "deleted", id });
    const wasOpen = chatId === id;
    dropChat(id);
    if (wasOpen) newChat();
    (chatsEl.querySelector(".chat-link") || $("new-chat")).focus();
  }

  function startRename(id) {
    const entry = chatEntry(id);
    const li = chatsEl.querySelector('li[data-chat-id="' + id + '"]');
    if (!entry || !li) return;
    const link = li.querySelector(".chat-link");
    const input = el("input", {
      type: "text", className: "rename-input", maxlength: MAX_TITLE, "aria-label": t("new_name"),
      value: entry.summary || "",
    });
    let done = false;
    const finish = async (commit) => {
      if (done) return;
      done = true;
      const text = input.value.trim();
      input.remove();
      renderChats();
      if (!commit || !text || text === entry.summary) {
        focusChatButton(id, ".rename");
        return;
      }
      const renamed = renameChat(id, text);  // shows the new title at once, then saves it
      focusChatButton(id, ".rename");
      await renamed;
      if (document.activeElement === document.body) focusChatButton(id, ".rename");  // a failed save re-rendered
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); finish(true); }
      else if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
    link.replaceWith(input);
    input.focus();
    input.select();
  }

  function focusChatButton(id, selector) {
    const node = chatsEl.querySelector('li[data-chat-id="' + id + '"] ' + selector);
    if (node) node.focus();
  }

  async function renameChat(id, text) {
    const entry = chatEntry(id);
    const before = entry ? entry.summary : null;
    setSummary(id, text);
    try {
      await api("PUT", "/chat-thread/" + encodeURIComponent(id) + "/summary", { summary: text, language });
      broadcast({ type: "renamed", id, summary: text });
    } catch (e) {
      if (entry) { entry.summary = before; if (localChats.includes(entry)) saveLocal(); renderChats(); }
      notice(t("rename_failed", { reason: e.code === "chat_forbidden" ? t("err_chat_forbidden") : e.message }));
    }
  }

  async function fillSummaries() {
    for (const c of localChats.slice(0, 30)) {
      if (c.summary) continue;
      try {
        const messages = await fetchThread(c.id);
        if (!messages.length) { forgetDeleted(c.id); continue; }
        const summaries = messages.filter((m) => m.role === "summary");
        if (summaries.length) setSummary(c.id, summaries[summaries.length - 1].text);
      } catch (e) { /* the sidebar keeps "Untitled chat" */ }
    }
  }

  // --- the chat socket --------------------------------------------------------------------------

  function frame(msgType, extra) {
    return JSON.stringify(Object.assign({
      msg_type: msgType, request_id: "", chat_id: chatId || "", session_id: sessionId,
      device_hash: deviceHash, text: "",
    }, extra));
  }

  function send(text) {
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(text); return true; }
    return false;
  }

  function register() {
    send(frame("register", auth ? { token: auth.jwt } : {}));
  }

  function socketBase() { return (location.protocol === "https:" ? "wss://" : "ws://") + location.host; }

  function connect() {
    showConnection("connecting");
    const socket = ws = new WebSocket(socketBase() + "/ws");
    socket.addEventListener("open", () => {
      retry = 0;
      showConnection("online");
      register();
    });
    socket.addEventListener("message", (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      if (data && typeof data === "object") onFrame(data);
    });
    socket.addEventListener("close", () => {
      if (ws !== socket) return;  // replaced on purpose (sign-in or sign-out)
      showConnection("offline");
      if (pending) endPrompt({ reason: "connection_lost", lost: true });
      const delay = Math.min(10000, 500 * 2 ** retry++);
      window.setTimeout(connect, delay);
    });
  }

  function reconnect() {
    const old = ws;
    ws = null;
    if (pending) endPrompt({ reason: "connection_lost", lost: true });
    if (old) old.close();
    connect();
    const oldSummaries = summaryWs;
    summaryWs = null;
    if (oldSummaries) oldSummaries.close();
    connectSummaries();
  }

  function onFrame(data) {
    const type = data.type;
    if (type === "system" && data.event === "registered") {
      if (!pending && data.chat_id === chatId && Array.isArray(data.history) && data.history.length) {
        renderHistory(data.history);
      }
      return;
    }
    if (type === "summary") {
      if (typeof data.chat_id === "string" && typeof data.text === "string") setSummary(data.chat_id, data.text);
      return;
    }
    if (type === "error" && !data.request_id) {
      if (SESSION_ERRORS.has(data.message) && auth) sessionEnded();
      else if (data.message === "chat_forbidden" && data.chat_id === chatId && !pending) notice(t("err_chat_forbidden"));
      return;
    }
    if (!pending || data.request_id !== pending.requestId) return;
    if (type === "system" && data.event === "chat_created" && typeof data.chat_id === "string") {
      chatId = pending.chatId = data.chat_id;
    } else if (type === "assistant" && typeof data.token === "string" && data.token) {
      if (!pending.text) accept(pending);
      pending.text += data.token;
      scheduleRender();
    } else if (type === "error") {
      pending.error = { code: String(data.message || "error"), detail: String(data.detail || "") };
    } else if (type === "assistant" && data.done === true) {
      endPrompt({ reason: typeof data.reason === "string" ? data.reason : "eos" });
    }
  }

  // Re-render the streaming reply at most once per frame.
  function scheduleRender() {
    if (!pending || pending.scheduled) return;
    pending.scheduled = true;
    const p = pending;
    const run = () => {
      p.scheduled = false;
      if (pending !== p) return;
      const nearBottom = messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 80;
      renderAssistant(p.bubble, p.text, true);
      if (nearBottom) scrollDown();
    };
    if (document.hidden) window.setTimeout(run, 100);
    else window.requestAnimationFrame(run);
  }

  // The server took the prompt: the message is sent, the box empties, the chat is listed.
  function accept(p) {
    if (p.accepted) return;
    p.accepted = true;
    p.userBubble.classList.remove("sending");
    if (promptEl.value === p.prompt) promptEl.value = "";
    if (!chatEntry(p.chatId)) {
      addChat(p.chatId, null, Boolean(auth));
      broadcast({ type: "added", id: p.chatId, owned: Boolean(auth) });
    }
  }

  function refusalText(error, reason) {
    const code = error ? error.code : reason;
    if (code === "rate_limited") {
      const seconds = /(\d+)\s*s\b/.exec(error ? error.detail : "");
      return t("err_rate_limited", { seconds: seconds ? seconds[1] : "60" });
    }
    if (code === "too_large") return t("err_too_large", { max: maxPromptChars });
    if (SESSION_ERRORS.has(code)) return t("err_session");
    if (I18N.has("en", "err_" + code)) return t("err_" + code);
    return t("err_generic", { code });
  }

  function endPrompt(outcome) {
    const p = pending;
    if (!p) return;
    pending = null;
    const reason = outcome.reason;
    const bubble = p.bubble;
    bubble.removeAttribute("aria-busy");
    if (!p.text && (outcome.lost || !TAKEN.has(reason))) {
      // Refused (rate limit, too long, busy, ...) or lost before anything came: nothing was stored,
      // so the message goes back to the box with the reason.
      p.userBubble.remove();
      bubble.remove();
      restorePrompt(p);
      const code = p.error ? p.error.code : reason;
      notice(outcome.lost ? t("connection_lost") : refusalText(p.error, reason),
        { signIn: code === "rate_limited" || code === "quota_exceeded" });
      announce(noticeTextEl.textContent);
      if (SESSION_ERRORS.has(code) && auth) sessionEnded();
    } else {
      accept(p);
      renderAssistant(bubble, p.text, false);
      const ending = reason === "length" ? "length" : reason === "cancelled" ? "cancelled"
        : COMPLETE.has(reason) ? "" : outcome.lost ? "interrupted" : "error";
      showEnding(bubble, ending, reason);
      if (ending === "error") notice(refusalText(p.error, reason));
      else if (outcome.lost) notice(t("connection_lost"));
      announce(ending ? bubble.querySelector(".ending").textContent : t("reply_done"));
      if (!p.text && reason === "cancelled") checkStored(p);
    }
    locked(false);
  }

  function restorePrompt(p) {
    if (!promptEl.value.trim()) promptEl.value = p.prompt;
    promptEl.focus();
  }

  // A prompt stopped before its first token may have been stopped before the server stored it:
  // then it is not in the history, so it leaves the page and goes back to the box.
  async function checkStored(p) {
    let messages;
    try { messages = await fetchThread(p.chatId); } catch (e) { return; }
    if (messages.some((m) => m.role === "user" && m.meta && m.meta.request_id === p.requestId) ||
        messages.some((m) => m.id === p.requestId)) return;
    if (chatId !== p.chatId || pending) return;
    p.userBubble.remove();
    p.bubble.remove();
    if (!messages.length) dropChat(p.chatId);
    restorePrompt(p);
    notice(t("not_sent_stopped"));
  }

  // --- composer ---------------------------------------------------------------------------------

  function submit() {
    const text = promptEl.value.trim();
    if (!text || pending) return;
    if (text.length > maxPromptChars) {  // the server would refuse it: say so without sending
      notice(t("err_too_large", { max: maxPromptChars }));
      return;
    }
    if (!chatId) chatId = uuid();
    const requestId = uuid();
    if (!send(frame("prompt", { request_id: requestId, text, language: languageEl.value }))) {
      notice(t("not_connected"));
      return;
    }
    notice("");
    const user = userBubble(text);
    user.classList.add("sending");
    const bubble = assistantBubble();
    bubble.setAttribute("aria-busy", "true");
    pending = { requestId, chatId, prompt: promptEl.value, text: "", userBubble: user, bubble, accepted: false };
    locked(true);
    announce(t("answering"));
  }

  $("composer").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  // the skip link focuses the box without touching the URL's fragment (it names the open chat)
  document.querySelector(".skip-link").addEventListener("click", (event) => { event.preventDefault(); promptEl.focus(); });
  promptEl.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
    else if (event.key === "Escape" && pending) { event.preventDefault(); stop(); }
  });
  function stop() {
    if (pending) send(frame("cancel", { request_id: pending.requestId, chat_id: pending.chatId }));
  }
  cancelEl.addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => { closeDrawer(false); newChat(); promptEl.focus(); });
  languageEl.addEventListener("change", () => {
    language = I18N.languages.includes(languageEl.value) ? languageEl.value : "en";
    save(STORE_LANGUAGE, language);
    applyLanguage();
  });

  // Copy buttons of code blocks (rendered by chat-markdown.js).
  messagesEl.addEventListener("click", async (event) => {
    const button = event.target.closest("button.copy-code");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("code").textContent;
    let ok = false;
    try {
      await navigator.clipboard.writeText(code);
      ok = true;
    } catch (e) {
      const area = el("textarea", { className: "clipboard", readonly: true });
      area.value = code;
      document.body.append(area);
      area.select();
      try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
      area.remove();
      button.focus();
    }
    button.textContent = ok ? t("copied") : t("copy_failed");
    button.dataset.copied = ok ? "1" : "0";
    announce(button.textContent);
    window.setTimeout(() => { button.textContent = t("copy"); delete button.dataset.copied; }, 2000);
  });

  // --- the drawer (narrow screens) --------------------------------------------------------------

  const narrow = window.matchMedia("(max-width: 720px)");

  function openDrawer() {
    sidebarEl.classList.add("open");
    backdropEl.hidden = false;
    menuEl.setAttribute("aria-expanded", "true");
    $("new-chat").focus();
  }
  function closeDrawer(returnFocus) {
    if (!sidebarEl.classList.contains("open")) return;
    sidebarEl.classList.remove("open");
    backdropEl.hidden = true;
    menuEl.setAttribute("aria-expanded", "false");
    if (returnFocus) menuEl.focus();
  }
  menuEl.addEventListener("click", () => (sidebarEl.classList.contains("open") ? closeDrawer(true) : openDrawer()));
  $("close-drawer").addEventListener("click", () => closeDrawer(true));
  backdropEl.addEventListener("click", () => closeDrawer(true));
  sidebarEl.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && narrow.matches && !event.target.classList.contains("rename-input")) closeDrawer(true);
  });
  narrow.addEventListener("change", () => { if (!narrow.matches) closeDrawer(false); });

  // --- accounts ---------------------------------------------------------------------------------

  function renderAccount() {
    const email = $("account-email");
    email.hidden = !auth;
    email.textContent = auth ? (auth.email ? t("signed_in_as", { email: auth.email }) : t("signed_in")) : "";
    $("sign-in").hidden = Boolean(auth);
    $("sign-out").hidden = !auth;
    noticeSignInEl.hidden = noticeSignInEl.hidden || Boolean(auth);
  }

  function setAuthMode(mode) {
    authMode = mode;
    const signUp = mode === "signup";
    for (const id of ["auth-title", "auth-submit"]) {
      $(id).dataset.i18n = signUp ? "sign_up" : "sign_in";
      $(id).textContent = t($(id).dataset.i18n);
    }
    $("auth-switch").dataset.i18n = signUp ? "to_sign_in" : "to_sign_up";
    $("auth-switch").textContent = t($("auth-switch").dataset.i18n);
    $("auth-password").autocomplete = signUp ? "new-password" : "current-password";
  }

  function showAuthError(text) {
    $("auth-error").textContent = text || "";
    $("auth-error").hidden = !text;
  }

  function openAuth(mode) {
    closeDrawer(false);
    setAuthMode(mode || "signin");
    showAuthError("");
    $("auth-claim-row").hidden = localChats.length === 0;
    let any = false;
    for (const provider of Object.values(providers)) {
      provider.button.hidden = !provider.id;
      any = any || Boolean(provider.id);
    }
    $("providers").hidden = !any;
    if (!dialogEl.open) dialogEl.showModal();
    $("auth-email").focus();
  }

  function authErrorText(e) {
    if (e.code === "rate_limited") return t("err_auth_rate");
    if (I18N.has("en", "err_" + e.code)) return t("err_" + e.code);
    return e.message;
  }

  $("auth-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const email = $("auth-email").value.trim();
    const password = $("auth-password").value;
    if (!email || !password) { showAuthError(t("err_invalid_credentials")); return; }
    const submitButton = $("auth-submit");
    submitButton.disabled = true;
    try {
      const path = authMode === "signup" ? "/api/auth/register" : "/api/auth/login";
      const data = await api("POST", path, { email, password, device_hash: deviceHash }, { anonymous: true });
      $("auth-password").value = "";
      await signedIn(data, $("auth-claim").checked);
      dialogEl.close();
      promptEl.focus();
    } catch (e) {
      showAuthError(authErrorText(e));
      $(e.code === "invalid_email" || e.code === "email_taken" ? "auth-email" : "auth-password").focus();
    } finally {
      submitButton.disabled = false;
    }
  });
  $("auth-cancel").addEventListener("click", () => dialogEl.close());
  $("auth-switch").addEventListener("click", () => { setAuthMode(authMode === "signup" ? "signin" : "signup"); showAuthError(""); });
  $("sign-in").addEventListener("click", () => openAuth("signin"));
  noticeSignInEl.addEventListener("click", () => openAuth("signin"));
  $("sign-out").addEventListener("click", signOut);

  // After any sign-in: keep the token, take over this browser's anonymous chats (when asked),
  // and reconnect so the sockets act for the account.
  async function signedIn(data, claim) {
    auth = { jwt: data.jwt, user_id: data.user_id, email: data.email || null };
    save(STORE_AUTH, auth);
    if (claim && localChats.length) {
      try {
        const result = await api("POST", "/api/chats/claim", { chat_ids: localChats.map((c) => c.id) });
        const moved = new Set([].concat(result.claimed || [], result.already_yours || [], result.not_found || []));
        localChats = localChats.filter((c) => !moved.has(c.id));
        saveLocal();
      } catch (e) { /* the chats stay anonymous, still listed from this browser */ }
    }
    await loadServerChats();
    renderAccount();
    reconnect();
    broadcast({ type: "auth" });
  }

  async function signOut() {
    const token = auth && auth.jwt;
    if (token) {
      try { await api("POST", "/api/auth/logout"); } catch (e) { /* signed out here in any case */ }
    }
    signedOutHere();
    broadcast({ type: "auth" });
  }

  function signedOutHere() {
    auth = null;
    save(STORE_AUTH, null);
    serverChats = [];
    renderAccount();
    renderChats();
    reconnect();
    if (chatId && !localChats.some((c) => c.id === chatId)) newChat();
  }

  function sessionEnded() {
    if (!auth) return;
    signedOutHere();
    broadcast({ type: "auth" });
    notice(t("err_session"), { signIn: true });
  }

  // Google and Apple: the provider's own sign-in page, back here with an ID token in the fragment
  // (no provider script runs on this page). `state` and `nonce` tie the answer to this browser.
  function startOAuth(name) {
    const provider = providers[name];
    if (!provider.id) return;
    const state = uuid();
    const nonce = uuid();
    save(STORE_OAUTH, { provider: name, state, nonce, chat: chatId, claim: $("auth-claim").checked }, sessionStorage);
    const redirect = location.origin + "/";
    const params = name === "google"
      ? { client_id: provider.id, response_type: "id_token", scope: "openid email", redirect_uri: redirect, state, nonce,
          prompt: "select_account" }
      : { client_id: provider.id, response_type: "code id_token", response_mode: "fragment", redirect_uri: redirect,
          state, nonce };
    const base = name === "google" ? "https://accounts.google.com/o/oauth2/v2/auth" : "https://appleid.apple.com/auth/authorize";
    location.assign(base + "?" + new URLSearchParams(params).toString());
  }
  providers.google.button.addEventListener("click", () => startOAuth("google"));
  providers.apple.button.addEventListener("click", () => startOAuth("apple"));

  function tokenNonce(idToken) {
    try {
      const part = idToken.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="))).nonce;
    } catch (e) { return null; }
  }

  // Returns the chat to open when this page load is the provider's answer, else null.
  async function finishOAuth() {
    if (!/[#&](id_token|error)=/.test(location.hash)) return null;
    const answer = new URLSearchParams(location.hash.slice(1));
    const started = load(STORE_OAUTH, null, sessionStorage);
    save(STORE_OAUTH, null, sessionStorage);
    history.replaceState(null, "", location.pathname);
    if (!started || !providers[started.provider]) return null;
    const title = providers[started.provider].title;
    const idToken = answer.get("id_token");
    if (!idToken || answer.get("state") !== started.state || tokenNonce(idToken) !== started.nonce) {
      notice(t("err_oauth", { provider: title }));
      return started.chat || null;
    }
    try {
      const data = await api("POST", "/api/auth/" + started.provider, { id_token: idToken, device_hash: deviceHash },
        { anonymous: true });
      await signedIn(data, started.claim !== false);
    } catch (e) {
      notice(t("err_oauth", { provider: title }) + " " + e.message);
    }
    return started.chat || null;
  }

  // --- title pushes (/chat-summary/ws) ------------------------------------------------------------

  function subscribe(ids) {
    const own = ids.filter((id) => SAFE_ID.test(id));
    if (summaryWs && summaryWs.readyState === WebSocket.OPEN && own.length) {
      summaryWs.send(JSON.stringify({ subscribe: own.slice(0, 200) }));
    }
  }

  function connectSummaries() {
    const url = socketBase() + "/chat-summary/ws" + (auth ? "?token=" + encodeURIComponent(auth.jwt) : "");
    const socket = summaryWs = new WebSocket(url);
    socket.addEventListener("open", () => {
      summaryRetry = 0;
      subscribe(localChats.map((c) => c.id));
    });
    socket.addEventListener("message", (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      if (!data || typeof data.chat_id !== "string" || typeof data.summary !== "string") return;
      if (chatEntry(data.chat_id)) setSummary(data.chat_id, data.summary);
      else if (auth && SAFE_ID.test(data.chat_id)) addChat(data.chat_id, data.summary, true);  // made on another device
    });
    socket.addEventListener("close", () => {
      if (summaryWs !== socket) return;
      window.setTimeout(connectSummaries, Math.min(30000, 1000 * 2 ** summaryRetry++));
    });
  }

  // --- other tabs of this browser -----------------------------------------------------------------

  if (channel) {
    channel.addEventListener("message", (event) => {
      const m = event.data || {};
      if (m.type === "deleted" && typeof m.id === "string") {
        if (pending && pending.chatId === m.id) { dropChat(m.id); return; }
        forgetDeleted(m.id);
      } else if (m.type === "renamed" && typeof m.id === "string") {
        setSummary(m.id, m.summary);
      } else if (m.type === "added" && typeof m.id === "string") {
        if (m.owned) { if (auth) addChat(m.id, null, true); } else { localChats = loadLocalChats(); renderChats(); subscribe([m.id]); }
      } else if (m.type === "auth") {
        const now = loadAuth();
        if ((now && now.jwt) === (auth && auth.jwt)) return;
        localChats = loadLocalChats();
        if (now) {
          auth = now;
          renderAccount();
          loadServerChats();
          reconnect();
        } else {
          signedOutHere();
        }
      }
    });
  }

  // Back to the tab: the account's list may have changed elsewhere, and the open chat may be gone.
  document.addEventListener("visibilitychange", async () => {
    if (document.hidden) return;
    if (auth) loadServerChats();
    const id = chatId;
    if (!pending && id && chatEntry(id)) {
      try {
        const messages = await fetchThread(id);
        if (!messages.length && chatId === id && !pending) forgetDeleted(id);
      } catch (e) { /* shown when opened */ }
    }
  });

  // --- start --------------------------------------------------------------------------------------

  applyLanguage();
  locked(false);
  connect();
  connectSummaries();
  (async () => {
    const back = await finishOAuth();
    if (auth && !serverChats.length) await loadServerChats();
    const fromHash = /^#chat=([A-Za-z0-9_-]{1,128})$/.exec(location.hash);
    const list = visibleChats();
    const first = back || (fromHash ? fromHash[1] : (list[0] ? list[0].id : uuid()));
    await openChat(first);
    fillSummaries();
  })();
})();
