// stowd's status page: refreshes its tables without a full reload and draws the charts.
// Served by stowd itself (no CDN); the page works without it (plain tables).  It never
// writes HTML from data: the tables come from the page stowd rendered (and escaped), the
// charts are drawn with DOM calls and textContent.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var SWAPPED = ["updated", "warnings", "totals", "sources", "runs", "destinations", "nodes",
                 "failures-note", "failures"];
  var SPANS = {"1h": {seconds: 3600, step: 60, label: "-60 min"},
               "24h": {seconds: 86400, step: 600, label: "-24 h"}};
  var every = (parseInt(document.body.getAttribute("data-refresh"), 10) || 5) * 1000;
  var busy = false;

  document.documentElement.classList.add("js");

  function get(url, kind) {
    return fetch(url, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error(url + ": " + r.status); }
      return kind === "json" ? r.json() : r.text();
    });
  }

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    if (!document.getElementById("sources") && fresh.getElementById("sources")) {
      location.reload();  // opened while the queue could not be read: it has none of the parts
      return;
    }
    SWAPPED.forEach(function (id) {
      var old = document.getElementById(id), now = fresh.getElementById(id);
      if (old && now) { old.replaceWith(document.adoptNode(now)); }
    });
  }

  function buckets(minutes, now, span) {
    var s = SPANS[span], n = s.seconds / s.step, end = Math.floor(now / s.step) * s.step;
    var start = end - (n - 1) * s.step, files = [], bytes = [], i;
    for (i = 0; i < n; i++) { files.push(0); bytes.push(0); }
    minutes.forEach(function (m) {
      var at = Math.floor((m[0] - start) / s.step);
      if (at >= 0 && at < n) { files[at] += m[1]; bytes[at] += m[2]; }
    });
    return {files: files.map(function (f) { return f / s.step; }),
            mb: bytes.map(function (b) { return b / 1e6 / s.step; })};
  }

  function node(svg, name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text !== undefined) { el.textContent = text; }
    svg.appendChild(el);
    return el;
  }

  function line(svg, values, cls) {
    var top = Math.max.apply(null, values.concat([0])), w = 560, h = 120;
    var points = values.map(function (v, i) {
      var x = 20 + (values.length > 1 ? i * w / (values.length - 1) : 0);
      var y = 140 - (top > 0 ? v / top * h : 0);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    if (cls === "files") {  // an area under the files line: MB/s of files of one size
      // follows it exactly, and two lines would hide one another
      node(svg, "polygon", {"class": cls, points: points.concat(["580,140", "20,140"]).join(" ")});
    }
    node(svg, "polyline", {"class": cls, points: points.join(" ")});
    return top;
  }

  function draw(svg, history, now) {
    var name = svg.getAttribute("data-destination"), span = svg.getAttribute("data-span");
    var all = history.destinations || {};
    var minutes = Object.prototype.hasOwnProperty.call(all, name) ? all[name] : [];
    var b = buckets(minutes, now, span);
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    node(svg, "line", {"class": "axis", x1: 20, y1: 140, x2: 580, y2: 140});
    var files = line(svg, b.files, "files"), mb = line(svg, b.mb, "mb");
    node(svg, "text", {"class": "files", x: 20, y: 14}, "files/s (max " + files.toFixed(2) + ")");
    node(svg, "text", {"class": "mb", x: 580, y: 14, "text-anchor": "end"},
         "MB/s (max " + mb.toFixed(2) + ")");
    node(svg, "text", {x: 20, y: 156}, SPANS[span].label);
    node(svg, "text", {x: 580, y: 156, "text-anchor": "end"}, "now");
  }

  function charts(doc) {
    var svgs = document.querySelectorAll("svg.chart");
    Array.prototype.forEach.call(svgs, function (svg) { draw(svg, doc.history, doc.time); });
  }

  // the charts are per minute: their data is fetched every CHARTS_EVERY-th refresh only
  var CHARTS_EVERY = 6, round = 0;

  function refresh() {
    if (busy) { return; }
    busy = true;
    round = (round + 1) % CHARTS_EVERY;
    var wanted = [get(location.pathname + location.search, "text")];
    if (round === 0) { wanted.push(get("api/status" + location.search, "json")); }
    Promise.all(wanted)
      .then(function (found) {
        swap(found[0]);
        if (found[1]) { charts(found[1]); }
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .then(function () { busy = false; });
  }

  // choosing a reason filters at once (without the script: the filter button)
  var filter = document.getElementById("failure-filter");
  if (filter) { filter.addEventListener("change", function () { filter.submit(); }); }

  get("api/status" + location.search, "json").then(charts).catch(function () {
    document.body.classList.add("stale");
  });
  setInterval(refresh, every);
}());
