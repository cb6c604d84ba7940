// Qwen3 playground: streams /v1/completions and /v1/chat/completions (OpenAI SSE chunks).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "completion", model: null, controller: null, chat: [] };
// The server's --api-key, asked for once when /v1 answers 401 and kept for this tab only.
const KEY_ITEM = "qwen3-api-key";

function apiHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function askForKey(message) {
  $("key-error").textContent = message || "";
  $("key-box").classList.remove("hidden");
  $("api-key").focus();
}

function formatCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + " B";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " K";
  return String(n);
}

async function loadModelInfo() {
  try {
    const res = await fetch("/v1/models", { headers: apiHeaders() });
    if (res.status === 401) {
      const hadKey = sessionStorage.getItem(KEY_ITEM) !== null;
      sessionStorage.removeItem(KEY_ITEM);
      $("model-info").textContent = "waiting for the API key";
      askForKey(hadKey ? "That key was refused; try again." : "");
      return;
    }
    const card = (await res.json()).data[0];
    state.model = card.id;
    $("model-info").innerHTML =
      `<b>${escapeHtml(card.id)}</b> · ${formatCount(card.num_params)} parameters · ` +
      `context ${card.max_model_len} tokens · ${escapeHtml(card.device)} ${escapeHtml(card.dtype)}`;
    $("max_tokens").max = card.max_tokens_cap || card.max_model_len;
  } catch (err) {
    $("model-info").textContent = "model info unavailable: " + err;
  }
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function samplingBody() {
  const body = {
    model: state.model,
    max_tokens: parseInt($("max_tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("top_k").value !== "") body.top_k = parseInt($("top_k").value, 10);
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  if ($("ignore_eos").checked) body.ignore_eos = true;
  const stop = $("stop_seq").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  if (stop) body.stop = [stop];
  return body;
}

// Read an SSE response and call onChunk for each JSON event until `data: [DONE]`.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
}

function showError(message) {
  $("error").textContent = message;
  $("error").classList.toggle("hidden", !message);
}

async function run(url, body, onText) {
  showError("");
  setBusy(true);
  state.controller = new AbortController();
  const started = performance.now();
  let tokens = 0; // from `usage` at the end; until then, the number of text events (about one per token)
  let events = 0;
  let finish = "";
  try {
    const res = await fetch(url, {
      method: "POST",
      headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (res.status === 401) {
      sessionStorage.removeItem(KEY_ITEM);
      askForKey("The server refused the key; enter it again.");
    }
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${res.status}`);
    }
    await readEvents(res, (chunk) => {
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices) {
        const text = choice.text !== undefined ? choice.text : (choice.delta.content || "");
        if (text) {
          events += 1;
          onText(text);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else showError(err.message);
  } finally {
    const secs = (performance.now() - started) / 1000;
    if (!tokens && events) tokens = events;
    const rate = tokens && secs > 0 ? ` · ${(tokens / secs).toFixed(1)} tokens/s` : "";
    $("stats").textContent = `${tokens} tokens in ${secs.toFixed(2)} s${rate}` + (finish ? ` · ${finish}` : "");
    state.controller = null;
    setBusy(false);
  }
}

function generateCompletion() {
  const prompt = $("prompt").value;
  const out = $("output");
  out.innerHTML = "";
  const echo = document.createElement("span");
  echo.className = "prompt-echo";
  echo.textContent = prompt;
  const gen = document.createElement("span");
  gen.className = "generated";
  out.append(echo, gen);
  return run("/v1/completions", { ...samplingBody(), prompt }, (text) => {
    gen.textContent += text;
    out.scrollTop = out.scrollHeight;
  });
}

function addBubble(role, text) {
  const log = $("chat-log");
  log.querySelector(".placeholder")?.remove();
  const bubble = document.createElement("div");
  bubble.className = `bubble ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  bubble.append(label, body);
  log.append(bubble);
  log.scrollTop = log.scrollHeight;
  return body;
}

async function generateChat() {
  const text = $("message").value.trim();
  if (!text) return;
  $("message").value = "";
  state.chat.push({ role: "user", content: text });
  addBubble("user", text);
  const body = addBubble("assistant", "");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.chat] : state.chat;
  await run("/v1/chat/completions", { ...samplingBody(), messages }, (delta) => {
    body.textContent += delta;
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
  });
  state.chat.push({ role: "assistant", content: body.textContent });
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.mode === mode);
  $("completion-pane").classList.toggle("hidden", mode !== "completion");
  $("chat-pane").classList.toggle("hidden", mode !== "chat");
}

function clearAll() {
  state.chat = [];
  $("output").innerHTML = '<span class="placeholder">The continuation appears here as it is generated.</span>';
  $("chat-log").innerHTML = '<span class="placeholder">Start the conversation below.</span>';
  $("stats").textContent = "";
  showError("");
}

for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(id + "_val").textContent = $(id).value; });
}
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
$("generate").addEventListener("click", () => (state.mode === "chat" ? generateChat() : generateCompletion()));
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", clearAll);
for (const id of ["prompt", "message"]) {
  $(id).addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) $("generate").click();
  });
}
$("key-box").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("api-key").value = "";
  $("key-box").classList.add("hidden");
  loadModelInfo();
});
loadModelInfo();
