// The chat page: streams replies from POST chat_stream (format "sse"), shows the queue position,
// the model (GET v1/models) and the server's load as gauges (GET get_load, once a second).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
const hint = $("hint");
const input = $("input");
const status = $("status");
const buttons = { send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear") };

let controller = null; // the AbortController of the reply being streamed

function setStatus(text, isError = false) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function addBubble(className, text = "") {
  hint.hidden = true;
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
    hint.hidden = log.querySelector(".msg") !== null;
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
  log.replaceChildren(hint);
  hint.hidden = false;
  setStatus("Conversation cleared.");
  setBusy(false);
});

for (const suggestion of hint.querySelectorAll(".suggestions button")) {
  suggestion.addEventListener("click", () => {
    if (controller) return;
    input.value = suggestion.textContent;
    $("form").requestSubmit();
  });
}

// The model's name, in the header and the hint.
fetch("v1/models")
  .then((response) => (response.ok ? response.json() : null))
  .then((body) => {
    const name = body?.data?.[0]?.id;
    if (name) $("model").textContent = $("hint-model").textContent = name;
  })
  .catch(() => {});

// The server's load, drawn: arcs for streams running and requests queued (green, amber near full,
// red at full) and a sparkline of tokens per second over the last minute.
const load = {
  element: $("load"),
  samples: [], // tokens/s, one a second
  last: null, // { tokens, time } of the previous reading
};

// One arc gauge per [data-gauge] element, from the page's single <template>.
for (const meter of document.querySelectorAll("[data-gauge]")) {
  meter.prepend($("gauge").content.cloneNode(true));
}

function drawArc(name, value, max) {
  const fraction = max > 0 ? Math.min(1, value / max) : 0;
  const meter = document.querySelector(`[data-gauge="${name}"]`);
  const arc = meter.querySelector(".arc");
  arc.setAttribute("stroke-dasharray", `${(fraction * 100).toFixed(1)} 100`);
  arc.classList.toggle("idle", fraction === 0);
  arc.classList.toggle("busy", fraction >= 0.75 && fraction < 1);
  arc.classList.toggle("full", fraction >= 1);
  meter.querySelector(".value").textContent = value;
}

function drawRate(rate) {
  const { samples } = load;
  samples.push(rate);
  if (samples.length > 60) samples.shift();
  // Newest on the right, 60 samples across; the scale follows the busiest second shown.
  const top = Math.max(10, ...samples) * 1.1;
  const x = (i) => (100 - (samples.length - 1 - i) * (100 / 59)).toFixed(1);
  const points = samples.map((value, i) => `${x(i)},${(56 - (value / top) * 52).toFixed(1)}`).join(" ");
  $("rate-line").setAttribute("points", points);
  $("rate-area").setAttribute("points", `${x(0)},56 ${points} 100,56`);
  $("rate-value").textContent = Math.round(rate);
}

async function pollLoad() {
  try {
    const response = await fetch("get_load", { cache: "no-store" });
    if (!response.ok) throw new Error(response.statusText);
    const now = await response.json();
    const time = performance.now();
    drawArc("streams", now.processing, now.max_processing);
    drawArc("queue", now.waiting, now.max_waiting);
    let rate = null;
    if (load.last && typeof now.generated_tokens === "number") {
      const seconds = (time - load.last.time) / 1000;
      rate = Math.max(0, now.generated_tokens - load.last.tokens) / seconds;
      drawRate(rate);
    }
    load.last = { tokens: now.generated_tokens, time };
    load.element.classList.remove("offline");
    const rateText = rate === null ? "" : `, ${Math.round(rate)} tokens/s`;
    load.element.setAttribute(
      "aria-label",
      `Server load: ${now.processing} of ${now.max_processing} streams, ${now.waiting} of ${now.max_waiting} waiting${rateText}`,
    );
  } catch {
    load.element.classList.add("offline");
    load.element.setAttribute("aria-label", "Server load: the server does not answer");
  }
}

async function loadLoop() {
  for (;;) {
    if (!document.hidden) await pollLoad();
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

loadLoop();
input.focus();
