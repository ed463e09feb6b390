// meshblock MGMT: the pages refresh their figures in place (docs/mgmt.md, "Refresh").
//
// Every data-refresh-s seconds (the <body>'s attribute, from [http] page_refresh_s;
// absent or 0: never) the page is fetched again and each element marked
// data-refresh (with an id) is replaced by the element of the same id in the new
// page; forms outside those elements are never touched. The refresh pauses while the
// user is in a form (a focused or changed field), while a dialog is open and while
// the tab is hidden. A 401 (the session ended) sends the browser to the login page;
// any other failure keeps the figures and tries again at the next interval.
// #refresh-status says which (data-state ok, paused, error, login).
(function () {
  "use strict";

  var seconds = parseFloat(document.body.getAttribute("data-refresh-s") || "0");
  if (!(seconds > 0) || !document.querySelector("[data-refresh][id]")) {
    return;
  }
  var status = document.getElementById("refresh-status");

  function say(state, text) {
    if (status) {
      status.setAttribute("data-state", state);
      status.textContent = text;
    }
  }

  function changed(field) {
    if (field.type === "hidden" || field.type === "submit" || field.type === "button") {
      return false;
    }
    if (field.type === "checkbox" || field.type === "radio") {
      return field.checked !== field.defaultChecked;
    }
    if (field.tagName === "SELECT") {
      var first = -1;
      for (var i = 0; i < field.options.length; i++) {
        if (field.options[i].defaultSelected) {
          if (first < 0) {
            first = i;
          }
          if (!field.options[i].selected) {
            return true;
          }
        } else if (field.multiple && field.options[i].selected) {
          return true;
        }
      }
      // a single choice without a default shows its first option (if any)
      return !field.multiple && field.selectedIndex !== Math.max(first, 0)
          && field.options.length > 0;
    }
    return field.value !== field.defaultValue;
  }

  function paused() {
    if (document.hidden || document.querySelector("dialog[open]")) {
      return true;
    }
    var active = document.activeElement;
    if (active && active.form && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName)
        && active.type !== "hidden") {
      return true;
    }
    var fields = document.querySelectorAll("form input, form textarea, form select");
    for (var i = 0; i < fields.length; i++) {
      if (changed(fields[i])) {
        return true;
      }
    }
    return false;
  }

  function apply(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    var regions = document.querySelectorAll("[data-refresh][id]");
    for (var i = 0; i < regions.length; i++) {
      // Not under the pointer nor holding the focus: a button the user is about to
      // press must not move or change under them (nor lose the keyboard's place).
      if (regions[i].matches(":hover") || regions[i].contains(document.activeElement)) {
        continue;
      }
      var next = fresh.getElementById(regions[i].id);
      if (next && next.hasAttribute("data-refresh")) {
        regions[i].replaceWith(document.importNode(next, true));
      }
    }
  }

  function toLogin() {
    say("login", "Your session has ended: to the login page.");
    window.location.assign(
      "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
  }

  function schedule() {
    window.setTimeout(tick, seconds * 1000);
  }

  function tick() {
    if (paused()) {
      say("paused", "Refresh paused while a form is in use.");
      schedule();
      return;
    }
    fetch(window.location.href, {
      credentials: "same-origin",
      cache: "no-store",
      redirect: "follow",
      headers: {"Accept": "text/html", "X-Meshblock-Refresh": "1"}
    }).then(function (resp) {
      if (resp.status === 401
          || (resp.redirected && new URL(resp.url).pathname === "/login")) {
        toLogin();  // and no further refresh
        return;
      }
      if (!resp.ok) {
        say("error", "Refresh failed (HTTP " + resp.status + "); trying again in "
            + seconds + " s.");
        schedule();
        return;
      }
      return resp.text().then(function (html) {
        if (!paused()) {
          apply(html);
          say("ok", "Updated " + new Date().toLocaleTimeString() + ".");
        }
        schedule();
      });
    }).catch(function (err) {
      say("error", "Refresh failed (" + err + "); trying again in " + seconds + " s.");
      schedule();
    });
  }

  schedule();
}());
