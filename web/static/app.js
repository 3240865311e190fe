// Model Engine UI: a few small behaviours on server-rendered pages, no framework.
// - [data-poll]: refresh a region from a fragment URL (paused while the tab is hidden)
// - [data-ago]: relative times ("12 s ago") kept current while the page stays open
// - [data-logs]: follow an endpoint's logs over a streamed response, starting again when its
//   replicas change ([data-replica-set] in a polled region), so a roll shows the new ones
// - [data-playground]: chat with streamed tokens
// - [data-upload]: send a model file as a request body, with its progress
// - [data-confirm] forms, [data-copy] buttons
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="csrf"]')?.content || "";
  // a script's request answered with the sign-in page: signed out in another tab, or expired
  const SIGNED_OUT = "You are signed out (the session ended): sign in again, in this tab or another, then try again.";
  const signedOut = (url) => new URL(url, window.location.href).pathname === "/ui/sign-in";

  document.addEventListener("submit", (event) => {
    const message = event.target.dataset?.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });

  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const input = document.querySelector(button.dataset.copy);
    input.select();
    navigator.clipboard?.writeText(input.value).then(
      () => { button.textContent = "Copied"; },
      () => document.execCommand("copy"),
    );
  });

  // --- polled regions -------------------------------------------------------------------
  function every(region) {
    const marker = region.querySelector("[data-every]");
    return Number(marker?.dataset.every || region.dataset.every || 5000);
  }

  function poll(region) {
    const tick = async () => {
      if (document.hidden) { setTimeout(tick, 1000); return; }
      try {
        const reply = await fetch(region.dataset.poll, { credentials: "same-origin" });
        if (reply.redirected) { window.location.reload(); return; }
        region.innerHTML = await reply.text();
        document.dispatchEvent(new CustomEvent("polled", { detail: region }));
        if (!reply.ok) { // gone: show the message, drop what acted on it, stop polling
          if (reply.status === 404) {
            document.querySelectorAll("[data-gone-hides]").forEach((node) => node.remove());
          }
          return;
        }
      } catch (_) { /* offline for a moment: try again later */ }
      setTimeout(tick, every(region));
    };
    setTimeout(tick, every(region));
  }
  document.querySelectorAll("[data-poll]").forEach(poll);

  // --- relative times -------------------------------------------------------------------
  // The server draws each with its seconds then (data-ago); the page adds the time it has
  // been open since, so the browser's own clock does not matter. Same words as web/views.py.
  function agoText(seconds) {
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }
  const seenAt = new WeakMap();
  function tickTimes() {
    const now = performance.now();
    document.querySelectorAll("time[data-ago]").forEach((node) => {
      if (!seenAt.has(node)) seenAt.set(node, now);
      const seconds = Number(node.dataset.ago) + Math.floor((now - seenAt.get(node)) / 1000);
      const text = agoText(seconds);
      if (node.textContent !== text) node.textContent = text;
    });
  }
  tickTimes();
  setInterval(tickTimes, 1000);

  // --- logs -----------------------------------------------------------------------------
  const LOG_KEPT_CHARS = 200000;
  const replicaSet = () => document.querySelector("[data-replica-set]")?.dataset.replicaSet;
  function followLogs(pre) {
    const state = document.querySelector("[data-logs-state]");
    const say = (text) => { if (state) state.textContent = text; };
    let following = null; // the open stream: its abort controller and the replicas it reads
    // A stream reads the replicas there were when it opened: after a roll (or a scale-up)
    // it is opened again, so the view follows the replicas the endpoint has now.
    document.addEventListener("polled", () => {
      if (following && following.replicas !== replicaSet()) following.controller.abort();
    });
    const connect = async () => {
      let fresh = true;
      const controller = new AbortController();
      following = { controller, replicas: replicaSet() };
      try {
        const reply = await fetch(pre.dataset.logs + "?follow=1", {
          credentials: "same-origin",
          signal: controller.signal,
        });
        if (reply.status === 429) {  // this key follows its most log streams: other tabs
          say("paused: too many log views open; retrying");
          setTimeout(connect, 10000);
          return;
        }
        if (!reply.ok) { say("unavailable"); return; }
        say("following");
        const reader = reply.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
          const text = decoder.decode(value, { stream: true });
          // every connection starts with the tail again, so it replaces what was shown
          pre.textContent = fresh ? text : (pre.textContent + text).slice(-LOG_KEPT_CHARS);
          fresh = false;
          if (stick) pre.scrollTop = pre.scrollHeight;
        }
      } catch (_) { /* reconnect below */ }
      following = null;
      if (controller.signal.aborted) { connect(); return; } // the replicas changed: at once
      if (!pre.textContent) pre.textContent = "No output yet.";
      say("waiting for replicas…");
      setTimeout(connect, 3000);
    };
    connect();
  }
  document.querySelectorAll("[data-logs]").forEach(followLogs);

  // --- playground -----------------------------------------------------------------------
  const playground = document.querySelector("[data-playground]");
  if (playground) setUpPlayground(playground);

  // the chat request's fields, named as the settings show them
  const CHAT_LABELS = { max_tokens: "Max tokens", temperature: "Temperature", messages: "Message", endpoint: "Endpoint" };

  function setUpPlayground(root) {
    const settings = root.querySelector("[data-chat-settings]");
    const composer = root.querySelector("[data-composer]");
    const list = root.querySelector("[data-messages]");
    const send = root.querySelector("[data-send]");
    const stop = root.querySelector("[data-stop]");
    const stat = (name, text) => { root.querySelector(`[data-stat="${name}"]`).textContent = text; };
    const temperature = settings.elements.temperature;
    const shown = root.querySelector('[data-show="temperature"]');
    temperature.addEventListener("input", () => { shown.textContent = temperature.value; });
    settings.addEventListener("submit", (event) => event.preventDefault());
    let history = [];
    let controller = null;

    const bubble = (kind, text) => {
      list.querySelector(".hint-empty")?.remove();
      const node = document.createElement("div");
      node.className = `msg-${kind}`;
      node.textContent = text;
      list.appendChild(node);
      list.scrollTop = list.scrollHeight;
      return node;
    };

    root.querySelector("[data-clear]").addEventListener("click", () => {
      history = [];
      list.textContent = "";
      ["tokens", "speed", "ttft"].forEach((name) => stat(name, "—"));
    });
    stop.addEventListener("click", () => controller?.abort());
    composer.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); composer.requestSubmit(); }
    });

    composer.addEventListener("submit", async (event) => {
      event.preventDefault();
      const prompt = composer.prompt.value.trim();
      if (!prompt || controller) return;
      composer.prompt.value = "";
      bubble("user", prompt);
      history.push({ role: "user", content: prompt });
      const system = settings.elements.system.value.trim();
      const messages = system ? [{ role: "system", content: system }, ...history] : history;
      const answer = bubble("assistant", "");
      answer.classList.add("streaming");
      answer.dataset.state = "streaming";
      answer.dataset.updates = "0";
      send.disabled = true;
      stop.hidden = false;
      controller = new AbortController();
      const started = performance.now();
      let first = 0;
      let last = 0;
      let pieces = 0;
      let usage = null;
      stat("tokens", "…");
      stat("speed", "…");
      stat("ttft", "waiting…");
      const show = () => {
        const tokens = usage?.completion_tokens ?? pieces;
        stat("tokens", String(tokens));
        if (first) stat("ttft", `${Math.round(first - started)} ms`);
        if (last > first && tokens > 1) stat("speed", `${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tok/s`);
      };
      try {
        const reply = await fetch("/ui/playground/chat", {
          method: "POST",
          credentials: "same-origin",
          headers: { "content-type": "application/json", "x-csrf-token": csrf },
          body: JSON.stringify({
            endpoint: settings.elements.endpoint.value,
            messages,
            temperature: Number(temperature.value),
            max_tokens: Number(settings.elements.max_tokens.value) || 256,
          }),
          signal: controller.signal,
        });
        // signed out meanwhile (in another tab, or the session expired): the sign-in page
        if (reply.redirected) throw new Error(SIGNED_OUT);
        if (!reply.ok) {
          const body = await reply.json().catch(() => ({}));
          throw new Error(describe(body, CHAT_LABELS) || `HTTP ${reply.status}`);
        }
        const reader = reply.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          const lines = buffer.split("\n");
          buffer = lines.pop();
          for (const line of lines) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            let chunk;
            try { chunk = JSON.parse(data); } catch (_) { continue; }
            if (chunk.error) throw new Error(chunk.error.message || "the model failed");
            if (chunk.usage) usage = chunk.usage;
            const delta = chunk.choices?.[0]?.delta?.content;
            if (delta) {
              last = performance.now();
              if (!first) first = last;
              pieces += 1;
              answer.textContent += delta;
              answer.dataset.updates = String(pieces);
              list.scrollTop = list.scrollHeight;
              show();
            }
          }
        }
        history.push({ role: "assistant", content: answer.textContent });
      } catch (error) {
        if (error.name !== "AbortError") bubble("error", error.message);
        history.pop();
        if (!answer.textContent) answer.remove();
        // unanswered: the prompt goes back in the box, to send again as it is or changed
        if (error.name !== "AbortError" && !composer.prompt.value) composer.prompt.value = prompt;
      } finally {
        answer.classList.remove("streaming");
        answer.dataset.state = "done";
        show();
        controller = null;
        send.disabled = false;
        stop.hidden = true;
      }
    });
  }

  // --- model upload ---------------------------------------------------------------------
  const uploadForm = document.querySelector("[data-upload]");
  if (uploadForm) setUpUpload(uploadForm);

  function setUpUpload(form) {
    const state = form.querySelector("[data-upload-state]");
    const bar = form.querySelector("[data-progress]");
    const button = form.querySelector("[data-upload-button]");
    const limit = Number(form.dataset.limit);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const file = form.querySelector("#u-file").files[0];
      if (!file) { state.textContent = "Choose a GGUF file first."; return; }
      if (file.size > limit) { state.textContent = `${file.name} is over the ${limit} byte limit.`; return; }
      const name = form.querySelector("#u-name").value.trim() || file.name;
      const overwrite = form.querySelector("#u-overwrite")?.checked ? "?overwrite=true" : "";
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", `/ui/models/files/${encodeURIComponent(name)}${overwrite}`);
      xhr.setRequestHeader("x-csrf-token", csrf);
      xhr.setRequestHeader("content-type", "application/octet-stream");
      xhr.upload.addEventListener("progress", (e) => {
        if (!e.lengthComputable) return;
        bar.value = Math.floor((100 * e.loaded) / e.total);
        state.textContent = `Uploading ${name}: ${bar.value}%`;
      });
      xhr.addEventListener("load", () => {
        button.disabled = false;
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
        if (xhr.responseURL && signedOut(xhr.responseURL)) {
          bar.hidden = true;
          state.textContent = SIGNED_OUT;
        } else if (xhr.status === 201) {
          state.dataset.sha256 = body.sha256;
          state.textContent = `Uploaded ${body.name} (${body.bytes} bytes, sha256 ${body.sha256}).`;
          bar.hidden = true;
          showModelFiles();
        } else {
          bar.hidden = true;
          state.textContent = describe(body) || `The upload failed (${xhr.status}).`;
        }
      });
      xhr.addEventListener("error", () => {
        button.disabled = false;
        bar.hidden = true;
        state.textContent = "The upload was cut off; nothing was kept. Try again.";
      });
      bar.hidden = false;
      bar.value = 0;
      button.disabled = true;
      state.textContent = `Uploading ${name}…`;
      xhr.send(file);
    });
  }

  // The "Model files" card drawn again, the new file in it; the page itself stays (a reload
  // would drop the upload's message, and send again a form the page was the answer to).
  async function showModelFiles() {
    const card = document.querySelector("#model-files");
    try {
      const reply = await fetch("/ui/models/files", { credentials: "same-origin" });
      if (reply.redirected) { window.location.reload(); return; } // signed out meanwhile
      if (reply.ok && card) card.outerHTML = await reply.text();
    } catch (_) { /* offline for a moment: the next visit lists it */ }
  }

  // An error answer as one line; `labels` names a request's fields as the page shows them.
  function describe(body, labels = {}) {
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => {
        const field = (d.loc || []).slice(1).join(".");
        return `${labels[field] || field}: ${d.msg}`;
      }).join("; ");
    }
    return body.error?.message || "";
  }
})();
