// idvault UI: small progressive enhancements; every form works without them.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  function csrf() {
    var input = document.querySelector('input[name="csrf_token"]');
    return input ? input.value : "";
  }

  function ready(fn) {
    if (document.readyState !== "loading") { fn(); } else { document.addEventListener("DOMContentLoaded", fn); }
  }

  ready(function () {
    // Owner switch: submit on change.
    document.querySelectorAll("select[data-autosubmit]").forEach(function (sel) {
      sel.addEventListener("change", function () { sel.form.submit(); });
    });

    // Copy buttons (the new API key).
    document.querySelectorAll("[data-copy]").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var target = document.querySelector(btn.getAttribute("data-copy"));
        if (!target) { return; }
        target.select();
        if (navigator.clipboard) { navigator.clipboard.writeText(target.value); } else { document.execCommand("copy"); }
        btn.textContent = "Copied";
      });
    });
    document.querySelectorAll("[data-select-on-focus]").forEach(function (el) {
      el.addEventListener("focus", function () { el.select(); });
    });

    var wizard = document.querySelector("form[data-wizard]");
    if (wizard) { setUpWizard(wizard); }
  });

  function setUpWizard(form) {
    var steps = Array.prototype.slice.call(form.querySelectorAll("[data-step]"));
    var labels = Array.prototype.slice.call(document.querySelectorAll("[data-steps] li"));
    var current = 0;

    function show(i) {
      current = i;
      steps.forEach(function (s, n) { s.hidden = n !== i; });
      labels.forEach(function (l, n) {
        if (n === i) { l.setAttribute("aria-current", "step"); } else { l.removeAttribute("aria-current"); }
        l.classList.toggle("done", n < i);
      });
      var first = steps[i].querySelector("input:not([type=hidden]):not([disabled]), select, textarea");
      if (first && i > 0) { first.focus(); }
    }

    var evidence = form.querySelector("#evidence");
    var evidenceHash = form.querySelector("#evidence_sha256");
    function checkEvidence() {
      if (!evidence || !evidenceHash) { return; }
      var missing = !(evidence.files && evidence.files.length) && !evidenceHash.value.trim();
      evidence.setCustomValidity(missing ? "Attach the signed consent form (or paste its SHA-256 below)." : "");
    }
    if (evidence) {
      evidence.addEventListener("change", checkEvidence);
      evidenceHash.addEventListener("input", checkEvidence);
    }

    function valid(step) {
      checkEvidence();
      var ok = true;
      step.querySelectorAll("input, select, textarea").forEach(function (el) {
        if (!el.checkValidity()) { el.setAttribute("data-touched", ""); if (ok) { el.reportValidity(); } ok = false; }
      });
      return ok;
    }

    form.querySelectorAll("[data-next]").forEach(function (btn) {
      btn.addEventListener("click", function () { if (valid(steps[current])) { show(current + 1); } });
    });
    form.querySelectorAll("[data-back]").forEach(function (btn) {
      btn.addEventListener("click", function () { show(current - 1); });
    });

    // Guardian fields only when a guardian consents.
    var guardianBox = form.querySelector("[data-guardian-fields]");
    var guardianName = form.querySelector("#guardian_name");
    function syncGuardian() {
      var checked = form.querySelector('input[name="given_by"]:checked');
      var isGuardian = checked && checked.value === "guardian";
      guardianBox.hidden = !isGuardian;
      guardianName.required = isGuardian;
    }
    form.querySelectorAll('input[name="given_by"]').forEach(function (r) { r.addEventListener("change", syncGuardian); });
    syncGuardian();

    // Per-photo feedback: each chosen photo is checked by the API (nothing stored).
    var input = form.querySelector("[data-photo-check]");
    var list = form.querySelector("[data-photo-list]");
    if (input && list && window.fetch && window.FormData) {
      input.addEventListener("change", function () { checkPhotos(input, list); });
    }

    form.addEventListener("submit", function (ev) {
      for (var i = 0; i < steps.length; i++) {
        if (!valid(steps[i])) { ev.preventDefault(); show(i); return; }
      }
      var busy = form.querySelector("[data-busy]");
      if (busy) { busy.hidden = false; }
      var submit = form.querySelector("[data-submit]");
      if (submit) { submit.disabled = true; }
    });

    // Start on the step that has a problem when the server sent the form back.
    var start = document.querySelector(".alert.duplicate, .photo-results") ? 2 : 0;
    show(start);
  }

  function checkPhotos(input, list) {
    list.innerHTML = "";
    var files = Array.prototype.slice.call(input.files || []);
    if (!files.length) { return; }
    var items = files.map(function (file) {
      var li = document.createElement("li");
      var img = document.createElement("img");
      img.alt = "";
      img.addEventListener("error", function () { img.classList.add("missing"); });
      img.src = URL.createObjectURL(file);
      var name = document.createElement("strong");
      name.textContent = file.name;
      var status = document.createElement("span");
      status.className = "status";
      status.textContent = "checking…";
      li.appendChild(img); li.appendChild(name); li.appendChild(status);
      list.appendChild(li);
      return { li: li, status: status };
    });
    var data = new FormData();
    files.forEach(function (f) { data.append("photos", f, f.name); });
    var pick = document.querySelector("#pick");
    if (pick && pick.value) { data.append("pick", pick.value); }
    fetch(input.getAttribute("data-photo-check"), {
      method: "POST", body: data, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf(), "Accept": "application/json" }
    }).then(function (resp) {
      return resp.json().then(function (body) { return { ok: resp.ok, body: body }; });
    }).then(function (r) {
      if (!r.ok) {
        var message = (r.body && r.body.error && r.body.error.message) || "could not check";
        items.forEach(function (it) { it.status.textContent = message; });
        return;
      }
      r.body.photos.forEach(function (res, i) {
        var it = items[i];
        if (!it) { return; }
        it.li.classList.add(res.ok ? "ok" : "bad");
        it.status.textContent = res.ok
          ? "✓ usable face (" + Math.round(res.face_px) + " px" + (res.faces_found > 1 ? ", " + res.faces_found + " faces" : "") + ")"
          : "✗ " + res.reason.replace(res.photo + ": ", "");
      });
    }).catch(function () {
      items.forEach(function (it) { it.status.textContent = "not checked (offline?)"; });
    });
  }
})();
