// Flotilla console: the one small script. Pages work without it; it adds live updates over
// Server-Sent Events, search-as-you-type and the "/" shortcut. Regions marked data-live="topics"
// are re-rendered from the page's own URL when the server says those topics changed.
(function () {
  "use strict";

  var status = document.getElementById("live-status");
  function setStatus(state, text) {
    if (!status) return;
    status.setAttribute("data-state", state);
    status.textContent = text;
  }

  // ---- re-rendering regions from the server ----
  var inFlight = false;
  var again = null;

  function swap(doc, ids) {
    ids.forEach(function (id) {
      var fresh = doc.getElementById(id);
      var old = document.getElementById(id);
      if (fresh && old && old.innerHTML !== fresh.innerHTML) {
        old.innerHTML = fresh.innerHTML;
      }
    });
  }

  function refresh(ids, url) {
    if (!ids.length) return;
    if (inFlight) {
      again = { ids: ids, url: url };
      return;
    }
    inFlight = true;
    fetch(url || window.location.href, {
      headers: { "X-Flotilla-Live": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (r) {
      if (r.status === 401) {
        window.location.href = "/ui/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
        return null;
      }
      return r.text();
    }).then(function (html) {
      if (html) swap(new DOMParser().parseFromString(html, "text/html"), ids);
    }).catch(function () {
      setStatus("error", "Update failed — use Refresh");
    }).then(function () {
      inFlight = false;
      if (again) {
        var a = again;
        again = null;
        refresh(a.ids, a.url);
      }
    });
  }

  // A region about one agent (data-uid) is left alone when the message names the agents a
  // topic was about and this one is not among them.
  function regionsFor(topics, uids) {
    var ids = [];
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var mine = el.getAttribute("data-live").split(/\s+/);
      var uid = el.getAttribute("data-uid");
      if (mine.some(function (t) {
        if (topics.indexOf(t) < 0) return false;
        var named = uids && uids[t];
        return !uid || !named || named.indexOf(uid) >= 0;
      })) ids.push(el.id);
    });
    return ids;
  }

  // ---- live updates ----
  function live() {
    if (!document.querySelector("[data-live]")) return;
    if (!window.EventSource) {
      setStatus("off", "Live updates unavailable — use Refresh");
      return;
    }
    var errors = 0;
    var es = new EventSource("/ui/events");
    es.addEventListener("open", function () {
      errors = 0;
      setStatus("on", "Live");
    });
    es.addEventListener("change", function (e) {
      var msg;
      try { msg = JSON.parse(e.data); } catch (_) { return; }
      refresh(regionsFor(msg.topics || [], msg.uids || null));
    });
    es.addEventListener("expired", function () {
      es.close();
      window.location.href = "/ui/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
    });
    es.addEventListener("shutdown", function () {
      es.close();
      setStatus("off", "Server stopped — use Refresh");
    });
    es.addEventListener("error", function () {
      errors += 1;
      if (es.readyState === EventSource.CLOSED || errors > 3) {
        es.close();
        setStatus("error", "Live updates off — use Refresh");
      } else {
        setStatus("error", "Reconnecting…");
      }
    });
    window.addEventListener("pagehide", function () { es.close(); });
  }

  // ---- search as you type (fleet page) ----
  function search() {
    var form = document.getElementById("search");
    var q = document.getElementById("q");
    if (!form || !q) return;
    var timer = null;
    q.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        var params = new URLSearchParams(new FormData(form));
        var url = form.getAttribute("action") + "?" + params.toString();
        window.history.replaceState(null, "", url);
        refresh(["results", "counts"], url);
      }, 300);
    });
  }

  // "/" focuses the search box, as in most tools.
  document.addEventListener("keydown", function (e) {
    if (e.key !== "/" || e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) return;
    var q = document.getElementById("q");
    if (q) {
      e.preventDefault();
      q.focus();
      q.select();
    }
  });

  search();
  live();
})();
