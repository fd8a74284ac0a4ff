// The chat page: keeps the conversation, sends it to /v1/chat/completions with stream: true, and appends the
// answer's deltas as the server-sent events arrive (fetch + ReadableStream; EventSource cannot POST).
"use strict";

const KEY_STORAGE = "pagestream.apiKey";

const ui = {
  messages: document.getElementById("messages"),
  empty: document.getElementById("empty"),
  form: document.getElementById("composer"),
  input: document.getElementById("input"),
  send: document.getElementById("send"),
  apiKey: document.getElementById("api-key"),
  temperature: document.getElementById("temperature"),
  maxTokens: document.getElementById("max-tokens"),
  model: document.getElementById("model"),
  newChat: document.getElementById("new-chat"),
};

let history = [];          // [{role, content}]: what the next request sends
let model = null;          // the served model's name, from /v1/models
let inFlight = null;       // the AbortController of the answer being streamed

ui.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const el = document.createElement("div");
  el.className = `message ${role}`;
  el.textContent = text;       // text, never HTML: the model's output is not trusted markup
  ui.messages.appendChild(el);
  scrollDown();
  return el;
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// The message of an OpenAI error body, or the status line when the body is not one.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      ui.model.textContent = response.status === 401 ? "(API key needed)" : "";
      return;
    }
    model = (await response.json()).data[0].id;
    ui.model.textContent = model;
  } catch (_) {
    ui.model.textContent = "";
  }
}

// Yields the JSON payload of each `data:` event until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  ui.send.textContent = busy ? "Stop" : "Send";
  ui.send.classList.toggle("stop", busy);
  ui.input.disabled = busy;
  if (!busy) ui.input.focus();
}

async function ask(question) {
  addMessage("user", question);
  history.push({ role: "user", content: question });
  const answer = addMessage("assistant", "");
  answer.dataset.state = "streaming";
  answer.dataset.chunks = "0";
  inFlight = new AbortController();
  setBusy(true);
  let text = "";
  try {
    const body = { messages: history, stream: true };
    if (model) body.model = model;
    // Left empty: the server's defaults. Out of range: the server says why (a 400 shown as an error).
    if (ui.temperature.value !== "") body.temperature = Number(ui.temperature.value);
    if (ui.maxTokens.value !== "") body.max_tokens = Number(ui.maxTokens.value);
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: inFlight.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        text += delta.content;
        answer.textContent = text;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        scrollDown();
      }
    }
    history.push({ role: "assistant", content: text });
    answer.dataset.state = "done";
  } catch (err) {
    const stopped = err.name === "AbortError";
    if (text) {
      history.push({ role: "assistant", content: text });   // keep what was said before it stopped
      answer.dataset.state = stopped ? "stopped" : "failed";
    } else {
      history.pop();                                        // the question got no answer: ask it again later
      answer.remove();
    }
    if (!stopped) addMessage("error", err.message || String(err));
  } finally {
    inFlight = null;
    setBusy(false);
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (inFlight) {
    inFlight.abort();            // closing the stream makes the server abort the request
    return;
  }
  const question = ui.input.value.trim();
  if (!question) return;
  ui.input.value = "";
  ask(question);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.newChat.addEventListener("click", () => {
  if (inFlight) inFlight.abort();
  history = [];
  ui.messages.querySelectorAll(".message").forEach((el) => el.remove());
  ui.empty.hidden = false;
  ui.input.focus();
});

loadModel();
ui.input.focus();
