// Ktulhu admin pages. Every piece of data goes into the page through textContent or attribute
// setters on elements built here; nothing is ever parsed as HTML.
"use strict";

(function () {
  const page = document.body.dataset.page;

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null) continue;
        if (key === "text") node.textContent = String(value);
        else if (key === "className") node.className = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, String(value));
      }
    }
    for (const child of children || []) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function status(text, kind) {
    const banner = document.getElementById("status");
    if (!banner) return;
    banner.textContent = text || "";
    banner.className = "status " + (kind || "info");
    banner.hidden = !text;
  }

  function when(ts) {
    if (typeof ts !== "number" || !isFinite(ts)) return "";
    // Stored timestamps are milliseconds; records written by the original are seconds.
    const ms = ts < 1e11 ? ts * 1000 : ts;
    return new Date(ms).toLocaleString();
  }

  async function api(method, url, body) {
    const init = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const message = data && data.message ? data.message : response.status + " " + response.statusText;
      throw new Error(message);
    }
    return data;
  }

  async function guarded(action) {
    try {
      await action();
    } catch (error) {
      status(error.message, "error");
    }
  }

  function setText(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value === null || value === undefined ? "–" : String(value);
  }

  // --- thread viewer (overview, devices, messages, chat pages) -------------------------------

  function classifierBox(meta) {
    if (!meta || typeof meta !== "object") return null;
    const cls = meta.classifier && typeof meta.classifier === "object" ? meta.classifier : null;
    const intent = meta.intent && typeof meta.intent === "object" ? meta.intent : null;
    if (!cls && !intent) return null;
    const rows = [];
    const head = (name, value) => {
      if (!value || typeof value !== "object") return;
      const score = typeof value.score === "number" ? value.score.toFixed(3) : "";
      rows.push(el("dt", { text: name }), el("dd", { text: String(value.label) + (score ? " (" + score + ")" : "") }));
    };
    if (cls) {
      head("Speech act", cls.speech_act);
      head("Domain", cls.domain);
      head("Expectation", cls.expectation);
      head("Phatic", cls.phatic);
      head("Support", cls.support);
    }
    if (intent) {
      for (const [name, key] of [["Prompt key", "prompt_key"], ["Routing path", "routing_path"],
                                 ["Intent kind", "final_intent_kind"], ["Language", "language"]]) {
        if (intent[key] !== undefined && intent[key] !== null) rows.push(el("dt", { text: name }), el("dd", { text: intent[key] }));
      }
    }
    return el("div", { className: "classifier" }, [el("h4", { text: "Classifier decision" }), el("dl", null, rows)]);
  }

  function messageCard(chatId, message, reload) {
    const role = String(message.role || "");
    const liked = Boolean(message.liked);
    const like = el("button", {
      type: "button", className: "small", text: liked ? "Unlike" : "Like",
      onclick: () => guarded(async () => {
        await api("PUT", "/internal/chat-thread/" + encodeURIComponent(chatId) + "/message/" +
                  encodeURIComponent(message.id) + "/liked", { liked: !liked });
        await reload();
      }),
    });
    const remove = el("button", {
      type: "button", className: "small danger", text: "Delete",
      onclick: () => guarded(async () => {
        if (!window.confirm("Delete this message?")) return;
        await api("DELETE", "/internal/chat-thread/" + encodeURIComponent(chatId) + "/message/" +
                  encodeURIComponent(message.id));
        await reload();
      }),
    });
    return el("article", { className: "message", dataset: { role } }, [
      el("header", null, [
        el("span", { className: "pill role-" + role.replace(/[^a-z]/g, ""), text: role }),
        el("span", { className: "muted", text: message.language || "" }),
        el("span", { className: "muted", text: when(message.ts) }),
        like, remove,
      ]),
      el("p", { className: "text", text: message.text || "" }),
      role === "user" ? classifierBox(message.meta) : null,
    ]);
  }

  async function showThread(chatId) {
    const panel = document.getElementById("thread-panel");
    const list = document.getElementById("thread");
    if (!panel || !list) return;
    const reload = async () => {
      const data = await api("GET", "/internal/chat-thread/" + encodeURIComponent(chatId));
      clear(list);
      document.getElementById("thread-chat-id").textContent = chatId;
      const messages = Array.isArray(data.messages) ? data.messages : [];
      if (!messages.length) list.append(el("p", { className: "muted", text: "No messages." }));
      for (const message of messages) list.append(messageCard(chatId, message, reload));
      panel.hidden = false;
    };
    await guarded(reload);
  }

  function chatLink(chatId) {
    return el("a", { href: "/internal/admin/chat/" + encodeURIComponent(chatId), text: chatId,
                     onclick: (event) => { event.preventDefault(); showThread(chatId); } });
  }

  // --- overview ------------------------------------------------------------------------------

  async function loadOverview() {
    const data = await api("GET", "/internal/admin/overview");
    for (const key of ["total_users", "total_devices", "total_chats", "total_messages", "liked_messages"]) {
      setText(key, data[key]);
    }
    const body = document.querySelector("#recent-chats tbody");
    clear(body);
    for (const chat of data.recent_chats || []) {
      body.append(el("tr", { dataset: { chatId: chat.chat_id } }, [
        el("td", null, [chatLink(chat.chat_id)]),
        el("td", { text: chat.summary || chat.title || "" }),
        el("td", { text: chat.device_hash || "" }),
        el("td", { text: chat.message_count }),
        el("td", { text: chat.liked_count }),
        el("td", { text: when(chat.updated_ts) }),
      ]));
    }
    status("", "info");
  }

  function seconds(value) {
    return typeof value === "number" ? (value * 1000).toFixed(1) + " ms" : "–";
  }

  async function loadEngine() {
    const data = await api("GET", "/internal/admin/engine");
    const engine = data.engine;
    setText("engine-busy", engine ? engine.busy_slots + " / " + engine.slots : "–");
    setText("engine-queue", engine ? engine.queue_depth + " / " + engine.queue_capacity : "–");
    setText("engine-kv", engine ? (engine.kv_usage * 100).toFixed(1) + " %" : "–");
    setText("engine-tps", typeof data.tokens_per_second === "number" ? data.tokens_per_second.toFixed(1) : "–");
    setText("engine-ttft", seconds(data.ttft_mean_seconds));
    setText("router-latency", seconds(data.router_latency_mean_seconds));
    setText("ws-sessions", data.ws_sessions);
  }

  async function loadDoctor() {
    const data = await api("GET", "/internal/admin/doctor");
    const body = document.querySelector("#doctor tbody");
    clear(body);
    for (const check of data.checks || []) {
      body.append(el("tr", { className: "doctor-" + check.status }, [
        el("td", { text: check.name }),
        el("td", { text: check.status }),
        el("td", { text: check.summary }),
        el("td", { text: check.fix || "" }),
      ]));
    }
  }

  // --- devices -------------------------------------------------------------------------------

  async function showDevice(device) {
    document.getElementById("device-hash").textContent = device.device_hash;
    setText("device-user", device.user_email || device.user_id);
    setText("device-created", when(device.created_ts));
    setText("device-seen", when(device.last_seen_ts));
    const data = await api("GET", "/internal/chats/by-device/" + encodeURIComponent(device.device_hash));
    const body = document.querySelector("#device-chats tbody");
    clear(body);
    for (const chat of data.chats || []) {
      body.append(el("tr", null, [
        el("td", null, [chatLink(chat.chat_id)]),
        el("td", { text: chat.title || chat.summary || "" }),
        el("td", { text: when(chat.updated_ts) }),
      ]));
    }
    document.getElementById("device-panel").hidden = false;
  }

  async function loadDevices() {
    const data = await api("GET", "/internal/admin/devices/list");
    const body = document.querySelector("#devices tbody");
    clear(body);
    for (const device of data.devices || []) {
      const open = el("a", { href: "#", text: device.device_hash,
                             onclick: (event) => { event.preventDefault(); guarded(() => showDevice(device)); } });
      body.append(el("tr", null, [
        el("td", null, [open]),
        el("td", { text: device.user_email || device.user_id }),
        el("td", { text: device.user_role || "" }),
        el("td", { text: when(device.last_seen_ts) }),
      ]));
    }
    status("", "info");
  }

  // --- latest messages -----------------------------------------------------------------------

  // Long messages are shown as their head (a few lines) with a button for the rest, so one long
  // message cannot stretch the table over thousands of pixels.
  const PREVIEW_CHARS = 280;
  const PREVIEW_LINES = 4;

  function preview(text) {
    const lines = text.split("\n");
    let head = lines.slice(0, PREVIEW_LINES).join("\n");
    if (head.length > PREVIEW_CHARS) head = head.slice(0, PREVIEW_CHARS);
    return head.length < text.length ? head.replace(/\s+$/, "") + " …" : text;
  }

  function textCell(value) {
    const full = String(value || "");
    const short = preview(full);
    if (short === full) return el("td", { className: "text", text: full });
    const shown = el("span", { className: "clip", text: short });
    const more = "Show all (" + full.length.toLocaleString() + " characters)";
    const toggle = el("button", { type: "button", className: "small more", text: more, "aria-expanded": "false" });
    toggle.addEventListener("click", () => {
      const open = toggle.getAttribute("aria-expanded") !== "true";
      shown.textContent = open ? full : short;
      toggle.textContent = open ? "Show less" : more;
      toggle.setAttribute("aria-expanded", String(open));
    });
    return el("td", { className: "text clipped" }, [shown, " ", toggle]);
  }

  async function loadMessages() {
    const limit = document.getElementById("limit").value;
    const data = await api("GET", "/internal/admin/last?limit=" + encodeURIComponent(limit));
    const body = document.querySelector("#messages tbody");
    clear(body);
    for (const message of data.messages || []) {
      body.append(el("tr", null, [
        el("td", { text: when(message.ts) }),
        el("td", null, [chatLink(message.chat_id)]),
        el("td", { text: message.role }),
        el("td", { text: message.language || "" }),
        textCell(message.text),
      ]));
    }
    status("", "info");
  }

  // --- users ---------------------------------------------------------------------------------

  function userRow(user) {
    const select = el("select", { "aria-label": "Role of " + user.id, dataset: { userId: user.id } },
      ["free", "paid", "admin"].map((role) => el("option", { value: role, text: role })));
    select.value = user.role;
    select.addEventListener("change", () => guarded(async () => {
      const result = await api("PUT", "/internal/users/" + encodeURIComponent(user.id) + "/role", { role: select.value });
      status("Role of " + (user.email || user.id) + " is now " + result.role + ".", "ok");
      await loadUsers(true);
    }));
    const remove = el("button", {
      type: "button", className: "small danger", text: "Remove", dataset: { userId: user.id },
      onclick: () => guarded(async () => {
        if (!window.confirm("Remove user " + (user.email || user.id) + "?")) return;
        await api("DELETE", "/internal/users/" + encodeURIComponent(user.id));
        status("Removed " + (user.email || user.id) + ".", "ok");
        await loadUsers(true);
      }),
    });
    const stripe = [];
    if (user.stripe_customer_id) stripe.push("Cust: " + user.stripe_customer_id);
    if (user.stripe_subscription_id) stripe.push("Sub: " + user.stripe_subscription_id);
    const limit = user.generation_limit === null ? "∞" : user.generation_limit;
    return el("tr", { dataset: { userId: user.id } }, [
      el("td", { className: "mono", text: user.id }),
      el("td", { text: user.email || "" }),
      el("td", null, [select]),
      el("td", { className: "mono", text: stripe.join(" ") }),
      el("td", { text: user.can_generate ? "Enabled" : "Blocked" }),
      el("td", { text: user.generation_count + " / " + limit }),
      el("td", { text: user.generations_remaining === null ? "∞" : user.generations_remaining }),
      el("td", { text: when(user.created_ts) }),
      el("td", null, [remove]),
    ]);
  }

  async function loadUsers(keepStatus) {
    const data = await api("GET", "/internal/users/list");
    const body = document.querySelector("#users tbody");
    clear(body);
    for (const user of data.users || []) body.append(userRow(user));
    if (!keepStatus) status("", "info");
  }

  // --- wiring --------------------------------------------------------------------------------

  const loaders = {
    overview: async () => { await Promise.all([loadOverview(), loadEngine(), loadDoctor()]); },
    devices: loadDevices,
    messages: loadMessages,
    users: () => loadUsers(false),
    chat: () => showThread(document.body.dataset.chatId),
  };
  const load = loaders[page];
  if (!load) return;
  const refresh = document.getElementById("refresh");
  if (refresh) refresh.addEventListener("click", () => guarded(load));
  const limit = document.getElementById("limit");
  if (limit) limit.addEventListener("change", () => guarded(load));
  if (page === "overview") window.setInterval(() => guarded(loadEngine), 5000);
  guarded(load).then(() => { document.body.dataset.loaded = "1"; });
})();
