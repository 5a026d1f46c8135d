// Ktulhu's built-in chat page: streams replies over /ws, keeps this browser's chats in localStorage.
// All text reaches the page through textContent; nothing is parsed as HTML.
"use strict";

(function () {
  const STORE_CHATS = "ktulhu.chats";
  const STORE_DEVICE = "ktulhu.device";
  const STORE_LANGUAGE = "ktulhu.language";
  const MAX_CHATS = 100;

  const $ = (id) => document.getElementById(id);
  const messagesEl = $("messages");
  const chatsEl = $("chats");
  const promptEl = $("prompt");
  const sendEl = $("send");
  const cancelEl = $("cancel");
  const languageEl = $("language");
  const titleEl = $("chat-title");
  const noticeEl = $("notice");
  const connEl = $("connection");

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function load(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value === null ? fallback : value;
    } catch (e) { return fallback; }
  }
  function save(key, value) {
    try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode: keep in memory */ }
  }

  let deviceHash = load(STORE_DEVICE, null);
  if (typeof deviceHash !== "string" || !/^[A-Za-z0-9_-]{1,128}$/.test(deviceHash)) {
    deviceHash = "web-" + uuid().replace(/-/g, "").slice(0, 24);
    save(STORE_DEVICE, deviceHash);
  }
  const sessionId = uuid();
  let chats = load(STORE_CHATS, []).filter((c) => c && typeof c.id === "string" && /^[A-Za-z0-9_-]{1,128}$/.test(c.id));
  let chatId = null;
  let chatSaved = false;      // the current chat is in the sidebar (it has at least one prompt)
  let pending = null;         // {requestId, chatId, bubble}
  let ws = null;
  let retry = 0;

  const savedLanguage = load(STORE_LANGUAGE, "en");
  if ([...languageEl.options].some((o) => o.value === savedLanguage)) languageEl.value = savedLanguage;
  languageEl.addEventListener("change", () => save(STORE_LANGUAGE, languageEl.value));

  // --- rendering -----------------------------------------------------------------------------

  function notice(text) {
    noticeEl.textContent = text || "";
    noticeEl.hidden = !text;
  }

  function bubble(role, text) {
    const node = document.createElement("div");
    node.className = "msg " + (role === "user" ? "user" : "assistant");
    node.dataset.role = role;
    node.textContent = text || "";
    messagesEl.append(node);
    messagesEl.scrollTop = messagesEl.scrollHeight;
    return node;
  }

  function renderHistory(messages) {
    while (messagesEl.firstChild) messagesEl.removeChild(messagesEl.firstChild);
    let summary = null;
    for (const m of messages) {
      if (!m || typeof m !== "object") continue;
      if (m.role === "summary") { summary = m.text; continue; }
      if (m.role !== "user" && m.role !== "assistant") continue;  // system and others stay hidden
      bubble(m.role, m.text);
    }
    if (summary) setSummary(chatId, summary);
  }

  function chatEntry(id) { return chats.find((c) => c.id === id); }

  function setSummary(id, text) {
    const entry = chatEntry(id);
    if (entry && text) { entry.summary = String(text).slice(0, 200); save(STORE_CHATS, chats); }
    renderChats();
  }

  function renderChats() {
    while (chatsEl.firstChild) chatsEl.removeChild(chatsEl.firstChild);
    for (const c of chats) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "chat-link" + (c.id === chatId ? " active" : "");
      button.dataset.chatId = c.id;
      button.textContent = c.summary || "Untitled chat";
      button.title = c.id;
      button.addEventListener("click", () => openChat(c.id));
      li.append(button);
      chatsEl.append(li);
    }
    const current = chatEntry(chatId);
    titleEl.textContent = current && current.summary ? current.summary : (chatSaved ? "Untitled chat" : "New chat");
  }

  function locked(on) {
    sendEl.disabled = on;
    cancelEl.hidden = !on;
    promptEl.readOnly = on;
  }

  // --- chats ---------------------------------------------------------------------------------

  async function fetchThread(id) {
    const response = await fetch("/chat-thread/" + encodeURIComponent(id), { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error("history unavailable (" + response.status + ")");
    const data = await response.json();
    return Array.isArray(data.messages) ? data.messages : [];
  }

  async function openChat(id) {
    if (pending) return;  // finish or stop the running reply first
    chatId = id;
    chatSaved = Boolean(chatEntry(id));
    history.replaceState(null, "", "#chat=" + encodeURIComponent(id));
    renderChats();
    renderHistory([]);
    notice("");
    register();
    try {
      const messages = await fetchThread(id);
      if (chatId !== id || pending) return;
      renderHistory(messages);
      if (messages.length && !chatEntry(id)) {  // a chat opened from a link
        chats.unshift({ id, summary: null });
        save(STORE_CHATS, chats);
        chatSaved = true;
        renderChats();
        const summaries = messages.filter((m) => m.role === "summary");
        if (summaries.length) setSummary(id, summaries[summaries.length - 1].text);
      }
    } catch (e) {
      if (chatSaved) notice(e.message);
    }
  }

  function newChat() {
    if (pending) return;
    openChat(uuid());
    promptEl.focus();
  }

  async function fillSummaries() {
    for (const c of chats.slice(0, 30)) {
      if (c.summary) continue;
      try {
        const summaries = (await fetchThread(c.id)).filter((m) => m.role === "summary");
        if (summaries.length) setSummary(c.id, summaries[summaries.length - 1].text);
      } catch (e) { /* the sidebar keeps "Untitled chat" */ }
    }
  }

  // --- WebSocket -----------------------------------------------------------------------------

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
    send(frame("register", {}));
  }

  function connect() {
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    connEl.dataset.state = "connecting";
    connEl.textContent = "connecting…";
    ws = new WebSocket(url);
    ws.addEventListener("open", () => {
      retry = 0;
      connEl.dataset.state = "online";
      connEl.textContent = "online";
      register();
    });
    ws.addEventListener("message", (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      if (data && typeof data === "object") onFrame(data);
    });
    ws.addEventListener("close", () => {
      connEl.dataset.state = "offline";
      connEl.textContent = "offline – reconnecting";
      if (pending) finish("the connection was lost");
      const delay = Math.min(10000, 500 * 2 ** retry++);
      window.setTimeout(connect, delay);
    });
  }

  function finish(problem) {
    if (pending && pending.bubble && !pending.bubble.textContent) pending.bubble.remove();
    pending = null;
    locked(false);
    if (problem) notice(problem);
    document.body.dataset.idle = "1";
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
    if (!pending || data.request_id !== pending.requestId) return;
    if (type === "system" && data.event === "chat_created" && typeof data.chat_id === "string") {
      const entry = chatEntry(pending.chatId);
      if (entry) entry.id = data.chat_id;
      chatId = pending.chatId = data.chat_id;
      save(STORE_CHATS, chats);
      renderChats();
    } else if (type === "assistant" && typeof data.token === "string" && data.token) {
      pending.bubble.textContent += data.token;
      messagesEl.scrollTop = messagesEl.scrollHeight;
    } else if (type === "error") {
      notice(data.detail || data.message || "the server could not answer");
    } else if (type === "assistant" && data.done === true) {
      if (data.reason === "cancelled") pending.bubble.classList.add("cancelled");
      finish(null);
    }
  }

  // --- composer ------------------------------------------------------------------------------

  function submit() {
    const text = promptEl.value.trim();
    if (!text || pending) return;
    if (!chatId) chatId = uuid();
    const requestId = uuid();
    const payload = frame("prompt", { request_id: requestId, text, language: languageEl.value });
    if (!send(payload)) { notice("not connected yet; try again in a moment"); return; }
    notice("");
    delete document.body.dataset.idle;
    if (!chatEntry(chatId)) {
      chats.unshift({ id: chatId, summary: null });
      chats = chats.slice(0, MAX_CHATS);
      save(STORE_CHATS, chats);
    }
    chatSaved = true;
    renderChats();
    bubble("user", text);
    pending = { requestId, chatId, bubble: bubble("assistant", "") };
    promptEl.value = "";
    locked(true);
  }

  $("composer").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  promptEl.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
  });
  cancelEl.addEventListener("click", () => {
    if (pending) send(frame("cancel", { request_id: pending.requestId, chat_id: pending.chatId }));
  });
  $("new-chat").addEventListener("click", newChat);

  // --- start ---------------------------------------------------------------------------------

  const fromHash = /^#chat=([A-Za-z0-9_-]{1,128})$/.exec(location.hash);
  const first = fromHash ? fromHash[1] : (chats[0] ? chats[0].id : uuid());
  document.body.dataset.idle = "1";
  connect();
  openChat(first).then(fillSummaries);
})();
