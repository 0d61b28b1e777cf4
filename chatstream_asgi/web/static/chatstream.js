// The chat page: streams replies from POST chat_stream (format "sse") and shows queue position.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
const status = $("status");
const buttons = { send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear") };

let controller = null; // the AbortController of the reply being streamed

function setStatus(text, isError = false) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function addBubble(className, text = "") {
  const div = document.createElement("div");
  div.className = className;
  div.textContent = text;
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function lastReply() {
  const replies = log.querySelectorAll(".assistant");
  return replies.length ? replies[replies.length - 1] : null;
}

function setBusy(busy) {
  buttons.send.disabled = busy;
  buttons.stop.disabled = !busy;
  buttons.clear.disabled = busy;
  buttons.regenerate.disabled = busy || lastReply() === null;
}

// Calls onEvent(name, data) for each server-sent event of the response body.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function queueText(position, wait) {
  const eta = wait == null ? "" : ` (about ${Math.max(1, Math.round(wait))} s)`;
  return `Waiting for a free slot: you are number ${position} in line${eta}.`;
}

async function errorDetail(response) {
  try {
    const body = await response.json();
    return body.detail || body.error || response.statusText;
  } catch {
    return response.statusText;
  }
}

// Streams one reply into `bubble`. Returns false when the request was not accepted.
async function streamReply(body, bubble) {
  controller = new AbortController();
  setBusy(true);
  setStatus("Sending…");
  bubble.textContent = "";
  bubble.className = "msg assistant pending";
  try {
    const response = await fetch("chat_stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, format: "sse" }),
      signal: controller.signal,
    });
    if (response.status === 429) {
      const retry = Number(response.headers.get("Retry-After")) || 0;
      const when = retry > 0 ? `in about ${retry} s` : "in a moment";
      setStatus(`The server is busy right now. Please try again ${when}.`);
      return false;
    }
    if (!response.ok) {
      setStatus(`Sorry, that did not work: ${await errorDetail(response)}`, true);
      return false;
    }
    setStatus("");
    await readEvents(response, (name, data) => {
      if (name === "queue") {
        setStatus(queueText(data.position, data.estimated_wait_seconds));
      } else if (name === "delta") {
        setStatus("");
        bubble.textContent += data.text;
        log.scrollTop = log.scrollHeight;
      } else if (name === "done") {
        bubble.dataset.messageId = data.message_id;
      } else if (name === "error") {
        bubble.classList.add("failed");
        setStatus(`The reply failed: ${data.detail || data.error}`, true);
      }
    });
    return true;
  } catch (err) {
    if (err.name === "AbortError") {
      bubble.classList.add("stopped");
      setStatus("Stopped.");
      return true;
    }
    bubble.classList.add("failed");
    setStatus(`The connection was lost: ${err.message}`, true);
    return true;
  } finally {
    bubble.classList.remove("pending");
    controller = null;
    setBusy(false);
  }
}

async function send(text) {
  const question = addBubble("msg user", text);
  const bubble = addBubble("msg assistant");
  if (!(await streamReply({ user_input: text }, bubble))) {
    question.remove();
    bubble.remove();
    input.value = text; // not sent: keep it for another try
    setBusy(false);
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("form").requestSubmit();
  }
});

buttons.stop.addEventListener("click", () => controller?.abort());

buttons.regenerate.addEventListener("click", async () => {
  const bubble = lastReply();
  if (!bubble || controller) return;
  const previous = bubble.textContent;
  if (!(await streamReply({ regenerate: true }, bubble))) bubble.textContent = previous;
});

buttons.clear.addEventListener("click", async () => {
  const response = await fetch("clear_context", { method: "POST" });
  if (!response.ok) {
    setStatus(`Could not clear the conversation: ${await errorDetail(response)}`, true);
    return;
  }
  log.replaceChildren();
  setStatus("Conversation cleared.");
  setBusy(false);
});

input.focus();
