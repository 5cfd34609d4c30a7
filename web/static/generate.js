/* The generation page: @handle autocomplete, layout preview, submit, progress, gallery.
   Without JavaScript the form posts to /generate and the gallery is rendered by the server. */
(function () {
  "use strict";

  var form = document.querySelector("form[data-generate]");
  if (!form) { return; }
  var prompt = form.querySelector("#prompt");
  var list = form.querySelector("[data-suggestions]");
  var layout = form.querySelector("#layout");
  var preview = form.querySelector("[data-layout-preview]");
  var progressBox = form.querySelector("[data-progress]");
  var bar = progressBox.querySelector("progress");
  var barText = progressBox.querySelector("[data-progress-text]");
  var errorBox = form.querySelector("[data-generate-error]");
  var submit = form.querySelector("[data-generate-submit]");
  var gallery = document.querySelector("[data-gallery]");
  var handles = [];
  var active = -1;

  function csrf() { return form.querySelector('input[name="csrf_token"]').value; }

  function api(url, options) {
    options = options || {};
    options.credentials = "same-origin";
    options.headers = Object.assign({ "Accept": "application/json" }, options.headers || {});
    return fetch(url, options).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (body) {
        if (!resp.ok) {
          var msg = (body.error && body.error.message) || ("HTTP " + resp.status);
          throw new Error(msg);
        }
        return body;
      });
    });
  }

  // -- the owner's usable handles --------------------------------------------------------------
  api(form.getAttribute("data-identities-url")).then(function (body) {
    handles = (body.items || []).filter(function (i) {
      return i.status === "active" && i.consent && i.consent.status === "active" &&
        (i.consent.purposes || []).indexOf("generate") >= 0;
    }).map(function (i) { return i.handle; });
  }).catch(function () { handles = []; });

  function mention() {
    var upto = prompt.value.slice(0, prompt.selectionStart);
    var m = /@([a-z0-9\/-]*)$/.exec(upto);
    return m ? { start: upto.length - m[0].length, text: m[1] } : null;
  }

  function hide() { list.hidden = true; list.innerHTML = ""; active = -1; prompt.removeAttribute("aria-activedescendant"); }

  function insert(handle, start, end) {
    var v = prompt.value;
    var text = "@" + handle + " ";
    prompt.value = v.slice(0, start) + text + v.slice(end);
    var caret = start + text.length;
    prompt.focus();
    prompt.setSelectionRange(caret, caret);
    hide();
  }

  function choose(handle) {
    var m = mention();
    if (m) { insert(handle, m.start, prompt.selectionStart); }
  }

  function show() {
    var m = mention();
    if (!m) { hide(); return; }
    var matches = handles.filter(function (h) {
      return h.indexOf(m.text) === 0 || h.split("/")[1].indexOf(m.text) === 0;
    }).slice(0, 8);
    if (!matches.length) { hide(); return; }
    list.innerHTML = "";
    matches.forEach(function (h, n) {
      var li = document.createElement("li");
      li.id = "handle-option-" + n;
      li.setAttribute("role", "option");
      li.setAttribute("aria-selected", "false");
      li.textContent = "@" + h;
      li.addEventListener("mousedown", function (ev) { ev.preventDefault(); choose(h); });
      list.appendChild(li);
    });
    list.hidden = false;
    select(0);
  }

  function select(n) {
    var items = list.querySelectorAll("li");
    if (!items.length) { return; }
    active = (n + items.length) % items.length;
    items.forEach(function (li, i) { li.setAttribute("aria-selected", i === active ? "true" : "false"); });
    prompt.setAttribute("aria-activedescendant", items[active].id);
  }

  prompt.addEventListener("input", show);
  prompt.addEventListener("blur", function () { setTimeout(hide, 100); });
  prompt.addEventListener("keydown", function (ev) {
    if (list.hidden) { return; }
    if (ev.key === "ArrowDown") { ev.preventDefault(); select(active + 1); }
    else if (ev.key === "ArrowUp") { ev.preventDefault(); select(active - 1); }
    else if (ev.key === "Enter" || ev.key === "Tab") {
      var items = list.querySelectorAll("li");
      if (active >= 0 && items[active]) { ev.preventDefault(); choose(items[active].textContent.slice(1)); }
    } else if (ev.key === "Escape") { hide(); }
  });

  document.querySelectorAll("[data-insert-handle]").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var at = prompt.selectionStart || prompt.value.length;
      var v = prompt.value;
      var lead = at > 0 && !/\s$/.test(v.slice(0, at)) ? " " : "";
      var text = lead + btn.getAttribute("data-insert-handle") + " ";
      prompt.value = v.slice(0, at) + text + v.slice(at);
      prompt.focus();
      prompt.setSelectionRange(at + text.length, at + text.length);
    });
  });

  // -- layout preview --------------------------------------------------------------------------
  function drawLayout() {
    if (!preview) { return; }
    preview.innerHTML = "";
    (layout.value || "").split(";").forEach(function (part) {
      var m = /^\s*@?([a-z0-9\/-]+)\s*=\s*([0-9.]+),([0-9.]+),([0-9.]+),([0-9.]+)\s*$/.exec(part);
      if (!m) { return; }
      var x0 = +m[2], y0 = +m[3], x1 = +m[4], y1 = +m[5];
      if (!(x1 > x0 && y1 > y0 && x1 <= 1 && y1 <= 1)) { return; }
      var box = document.createElement("div");
      box.className = "box";
      box.style.left = (x0 * 100) + "%";
      box.style.top = (y0 * 100) + "%";
      box.style.width = ((x1 - x0) * 100) + "%";
      box.style.height = ((y1 - y0) * 100) + "%";
      box.textContent = m[1];
      preview.appendChild(box);
    });
  }
  if (layout) { layout.addEventListener("input", drawLayout); drawLayout(); }

  // -- submit, progress, gallery -----------------------------------------------------------------
  function params() {
    var body = { prompt: prompt.value, method: form.querySelector("#method").value,
                 commercial: form.querySelector('input[name="commercial"]').checked };
    var seed = form.querySelector("#seed").value.trim();
    var steps = form.querySelector("#steps").value.trim();
    var size = form.querySelector("#size").value.trim().toLowerCase();
    if (seed) { body.seed = parseInt(seed, 10); }
    if (steps) { body.steps = parseInt(steps, 10); }
    if (size) { body.size = size.split("x").map(function (n) { return parseInt(n, 10); }); }
    if (layout && layout.value.trim()) { body.layout = layout.value.trim(); }
    return body;
  }

  function fail(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    submit.disabled = false;
  }

  function addToGallery(job, verdict) {
    var empty = gallery.querySelector("[data-gallery-empty]");
    if (empty) { empty.remove(); }
    var fig = document.createElement("figure");
    fig.className = "card shot";
    var link = document.createElement("a");
    link.href = "/generate/" + job.id;
    var img = document.createElement("img");
    img.src = "/v1/jobs/" + job.id + "/image";
    img.alt = "Generated: " + job.params.prompt;
    img.width = job.result.width;
    img.height = job.result.height;
    link.appendChild(img);
    fig.appendChild(link);
    var cap = document.createElement("figcaption");
    var p1 = document.createElement("p");
    p1.className = "small";
    p1.textContent = job.params.prompt;
    var p2 = document.createElement("p");
    p2.className = "small";
    var badge = document.createElement("span");
    badge.className = "badge " + (verdict.ok ? "active" : "withdrawn");
    badge.textContent = "provenance " + verdict.status;
    p2.appendChild(badge);
    (job.result.identities || []).forEach(function (h) {
      var chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = "@" + h;
      p2.appendChild(document.createTextNode(" "));
      p2.appendChild(chip);
    });
    var p3 = document.createElement("p");
    var open = document.createElement("a");
    open.href = "/generate/" + job.id;
    open.textContent = "Open";
    p3.appendChild(open);
    cap.appendChild(p1); cap.appendChild(p2); cap.appendChild(p3);
    fig.appendChild(cap);
    gallery.insertBefore(fig, gallery.firstChild);
  }

  function poll(id) {
    api(form.getAttribute("data-jobs-url") + "/" + id).then(function (job) {
      bar.value = job.progress || 0;
      barText.textContent = job.status + (job.message ? ": " + job.message : "");
      if (job.status === "done") {
        return api(form.getAttribute("data-jobs-url") + "/" + id + "/verify").then(function (v) {
          addToGallery(job, v);
          barText.textContent = "Done: " + v.message;
          submit.disabled = false;
        });
      }
      if (job.status === "failed" || job.status === "cancelled") {
        fail("The scene was not made: " + (job.error || job.message || job.status));
        return null;
      }
      setTimeout(function () { poll(id); }, 500);
      return null;
    }).catch(function (e) { fail(e.message); });
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    errorBox.hidden = true;
    if (!form.reportValidity()) { return; }
    submit.disabled = true;
    progressBox.hidden = false;
    bar.value = 0;
    barText.textContent = "Submitting…";
    api(form.getAttribute("data-submit-url"), {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(params())
    }).then(function (job) { poll(job.id); }).catch(function (e) { fail(e.message); });
  });
})();
