/* crosslib feature explorer. Runs from file:// with no server: every data file is a script
   (explorer-data/NAME.js) that calls crosslibExplorer.receive(NAME, data); scripts are inserted
   only when needed (the index at start, a detail shard when a feature is opened, the search
   files when a search is typed). */
(function () {
  "use strict";
  var DATA = "explorer-data/";
  var PAGE = 200; // rows rendered at a time
  var received = {}, waiting = {};

  function load(name) {
    if (received[name]) return Promise.resolve(received[name]);
    return new Promise(function (resolve, reject) {
      if (waiting[name]) { waiting[name].push([resolve, reject]); return; }
      waiting[name] = [[resolve, reject]];
      var script = document.createElement("script");
      script.src = DATA + name + ".js";
      script.onerror = function () {
        var callbacks = waiting[name] || [];
        delete waiting[name];
        callbacks.forEach(function (c) { c[1](new Error("could not load " + script.src)); });
      };
      document.head.appendChild(script);
    });
  }

  var index = null, n = 0, col = null, view = [], shown = 0, relevance = null, searchToken = 0;
  var $ = function (id) { return document.getElementById(id); };

  window.crosslibExplorer = {
    receive: function (name, data) {
      received[name] = data;
      var callbacks = waiting[name] || [];
      delete waiting[name];
      callbacks.forEach(function (c) { c[0](data); });
    },
    // For tests and the console: the feature ids that pass the current search and filters, in order.
    visibleFeatures: function () { return view.map(function (i) { return col.feature[i]; }); },
    ready: false
  };

  function esc(text) {
    return String(text).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; });
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (x !== 0 && Math.abs(x) < 0.001) return x.toExponential(1);
    return Number(x.toPrecision(digits || 3)).toString();
  }
  function visible(token) { return token.replace(/\r/g, "").replace(/\n/g, "⏎").replace(/\t/g, "⇥"); }

  // ------------------------------------------------------------------ list view
  function number(id) { var v = $(id) ? $(id).value : ""; return v === "" ? null : Number(v); }

  function filtersPass(i) {
    var inputs = document.querySelectorAll("#filters .filter");
    for (var k = 0; k < inputs.length; k++) {
      var name = inputs[k].getAttribute("data-column");
      var lo = inputs[k].querySelector(".min").value, hi = inputs[k].querySelector(".max").value;
      if (lo === "" && hi === "") continue;
      var v = col[name][i];
      if (v === null) return false;
      if (lo !== "" && v < Number(lo)) return false;
      if (hi !== "" && v > Number(hi)) return false;
    }
    var category = $("category").value, task = $("task").value;
    if (category !== "" && col.category[i] !== Number(category)) return false;
    if (task !== "" && !(col.tasks[i] & (1 << Number(task)))) return false;
    if (relevance && !(col.feature[i] in relevance)) return false;
    return true;
  }

  function compare(key, direction) {
    return function (a, b) {
      var x, y;
      if (key === "relevance") {
        x = relevance ? relevance[col.feature[a]] : 0; y = relevance ? relevance[col.feature[b]] : 0;
      } else { x = col[key][a]; y = col[key][b]; }
      if (x === null && y === null) return col.feature[a] - col.feature[b];
      if (x === null) return 1; // missing values last, whatever the direction
      if (y === null) return -1;
      var d = (x - y) * direction;
      return d !== 0 ? d : col.feature[a] - col.feature[b];
    };
  }

  function refresh() {
    view = [];
    for (var i = 0; i < n; i++) if (filtersPass(i)) view.push(i);
    var direction = $("direction").getAttribute("data-direction") === "asc" ? 1 : -1;
    view.sort(compare($("sort").value, direction));
    shown = 0;
    $("rows").innerHTML = "";
    $("count").textContent = view.length + " of " + n + " live features" + (relevance ? " match the search" : "");
    more();
  }

  function spark(rho) {
    var w = 76, h = 16, pts = [];
    for (var k = 0; k < rho.length; k++) {
      var x = rho.length > 1 ? (w * k) / (rho.length - 1) : w / 2;
      pts.push(x.toFixed(1) + "," + (h - 1 - ((h - 2) * Number(rho[k])) / 9).toFixed(1));
    }
    return '<svg class="spark" width="' + w + '" height="' + h + '" aria-hidden="true"><polyline points="' + pts.join(" ") + '"/></svg>';
  }

  function more() {
    var html = [], stop = Math.min(view.length, shown + PAGE), selected = selectedFeature();
    for (var k = shown; k < stop; k++) {
      var i = view[k], f = col.feature[i];
      html.push('<tr data-feature="' + f + '"' + (f === selected ? ' class="selected"' : "") + '><td><a href="#feature-' + f + '">' + f + "</a></td><td>" +
        esc(index.categories[col.category[i]]) + "</td><td>" + fmt(col.emergence_step[i]) + "</td><td>" + col.lifetime[i] +
        "</td><td>" + fmt(col.complexity[i]) + "</td><td>" + fmt(col.density[i], 2) + "</td><td>" + spark(col.rho[i]) +
        '</td><td class="tokens">' + esc(col.summary[i]) + "</td></tr>");
    }
    $("rows").insertAdjacentHTML("beforeend", html.join(""));
    shown = stop;
    $("more").hidden = shown >= view.length;
    $("more").textContent = "show more (" + (view.length - shown) + " left)";
  }

  // ------------------------------------------------------------------ search
  function lowerBound(list, value) {
    var lo = 0, hi = list.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (list[mid] < value) lo = mid + 1; else hi = mid; }
    return lo;
  }
  function shardOf(starts, token) { return lowerBound(starts, token + 1) - 1; }

  function matchingTokens(vocab, word) {
    var at = lowerBound(vocab.tokens, word);
    if (vocab.tokens[at] === word) return [at];
    var found = []; // no exact token: every token that starts with the word (at most 200)
    while (at < vocab.tokens.length && vocab.tokens[at].lastIndexOf(word, 0) === 0 && found.length < 200) found.push(at++);
    return found;
  }

  function search(text) {
    var ticket = ++searchToken, words = text.toLowerCase().split(/\s+/).filter(Boolean);
    if (!words.length) { relevance = null; refresh(); return Promise.resolve(); }
    var ids = words.filter(function (w) { return /^#\d+$/.test(w); });
    if (ids.length) {
      relevance = {};
      ids.forEach(function (w) { relevance[Number(w.slice(1))] = 0; });
      refresh();
      return Promise.resolve();
    }
    return load("search-vocab").then(function (vocab) {
      var perWord = words.map(function (w) { return matchingTokens(vocab, w); });
      var shards = {};
      perWord.forEach(function (tokens) { tokens.forEach(function (t) { shards[shardOf(vocab.shard_starts, t)] = true; }); });
      return Promise.all(Object.keys(shards).map(function (s) { return load("search-" + s); })).then(function () {
        if (ticket !== searchToken) return; // a newer search was typed meanwhile
        var result = null;
        perWord.forEach(function (tokens) {
          var best = {};
          tokens.forEach(function (t) {
            var s = shardOf(vocab.shard_starts, t), postings = received["search-" + s][t - vocab.shard_starts[s]];
            postings.forEach(function (code) {
              var f = Math.floor(code / 3), c = code % 3;
              if (!(f in best) || c < best[f]) best[f] = c;
            });
          });
          if (result === null) { result = best; return; }
          var both = {};
          Object.keys(result).forEach(function (f) { if (f in best) both[f] = Math.max(result[f], best[f]); });
          result = both;
        });
        relevance = result || {};
        if ($("sort").value === "feature") { $("sort").value = "relevance"; setDirection("asc"); }
        refresh();
      });
    });
  }

  // ------------------------------------------------------------------ detail view
  function selectedFeature() {
    var m = /^#feature-(\d+)$/.exec(location.hash);
    return m ? Number(m[1]) : null;
  }

  function trajectory(norms, steps, marker) {
    var w = 420, h = 150, left = 44, right = 10, top = 8, bottom = 22, pw = w - left - right, ph = h - top - bottom;
    var peak = Math.max.apply(null, norms.map(function (v) { return v || 0; })) || 1;
    var x = function (k) { return left + (norms.length > 1 ? (pw * k) / (norms.length - 1) : pw / 2); };
    var y = function (v) { return top + ph * (1 - (v || 0) / peak); };
    var pts = norms.map(function (v, k) { return x(k).toFixed(1) + "," + y(v).toFixed(1); }).join(" ");
    var dots = norms.map(function (v, k) {
      return '<circle cx="' + x(k).toFixed(1) + '" cy="' + y(v).toFixed(1) + '" r="2.4" fill="#0969da"><title>step ' + steps[k] + ": " + fmt(v, 4) + "</title></circle>";
    }).join("");
    var ticks = [0, Math.floor((norms.length - 1) / 2), norms.length - 1].filter(function (k, i, a) { return a.indexOf(k) === i; })
      .map(function (k) { return '<text x="' + x(k).toFixed(1) + '" y="' + (h - 6) + '" text-anchor="middle">' + steps[k] + "</text>"; }).join("");
    var mark = marker === null ? "" : '<line x1="' + x(marker).toFixed(1) + '" x2="' + x(marker).toFixed(1) + '" y1="' + top + '" y2="' + (top + ph) +
      '" stroke="#cf222e" stroke-dasharray="3,3"><title>formed at step ' + steps[marker] + "</title></line>";
    return '<svg width="' + w + '" height="' + h + '" role="img" aria-label="decoder norm over training steps">' +
      '<line x1="' + left + '" y1="' + (top + ph) + '" x2="' + (left + pw) + '" y2="' + (top + ph) + '" stroke="#8c959f"/>' +
      '<text x="' + (left - 4) + '" y="' + (top + 8) + '" text-anchor="end">' + fmt(peak) + "</text>" +
      '<text x="' + (left - 4) + '" y="' + (top + ph) + '" text-anchor="end">0</text>' + mark +
      '<polyline points="' + pts + '" fill="none" stroke="#0969da" stroke-width="1.5"/>' + dots + ticks + "</svg>";
  }

  function contextsHtml(contexts, vocab) {
    if (!contexts.length) return '<div class="ctx muted">(never active at this snapshot on the held-out text)</div>';
    var scale = Math.max.apply(null, contexts.map(function (c) { return c.a || 0; })) || 1;
    return contexts.map(function (c) {
      var acts = {};
      c.v.forEach(function (pair) { acts[pair[0]] = pair[1]; });
      var spans = c.t.map(function (id, k) {
        var a = acts[k] || 0, alpha = Math.min(1, Math.max(0, a / scale)), text = vocab[id];
        if (text === undefined) text = "[" + id + "]";
        return '<span class="tok' + (k === c.f ? " focus" : "") + '"' + (alpha >= 0.005 ? ' style="background:rgba(255,140,0,' + alpha.toFixed(2) + ')"' : "") +
          ' title="' + fmt(a, 4) + '">' + esc(visible(text)) + "</span>";
      }).join("");
      return '<div class="ctx" title="window ' + c.w + ", position " + c.p + '"><span class="act">' + fmt(c.a) + '</span><span class="text">' + spans + "</span></div>";
    }).join("");
  }

  function showFeature() {
    var f = selectedFeature();
    Array.prototype.forEach.call(document.querySelectorAll("#rows tr.selected"), function (r) { r.classList.remove("selected"); });
    if (f === null) return Promise.resolve();
    var row = document.querySelector('#rows tr[data-feature="' + f + '"]');
    if (row) row.classList.add("selected");
    var i = col.feature.indexOf(f), pane = $("detail");
    if (i < 0) {
      pane.setAttribute("data-feature", String(f));
      pane.innerHTML = "<h2>Feature " + f + "</h2><p>" + (f < index.n_features_total ?
        "This feature is dead: its decoder is zero at every snapshot, so the explorer does not list it." :
        "There is no such feature: the dictionary has " + index.n_features_total + " features.") + "</p>";
      return Promise.resolve();
    }
    pane.innerHTML = "<h2>Feature " + f + '</h2><p class="muted">loading…</p>';
    return Promise.all([load("detail-" + Math.floor(f / index.features_per_shard)), load("vocab")]).then(function (parts) {
      if (selectedFeature() !== f) return;
      var d = parts[0][String(f)], vocab = parts[1], steps = index.steps;
      var emerged = col.emergence_step[i];
      var formedLabel = emerged !== null ? "where it formed (step " + steps[d.formed_index] + ")" :
        "where its strong run starts (step " + steps[d.formed_index] + ", " + index.categories[col.category[i]] + " feature)";
      var facts = [
        ["category", index.categories[col.category[i]]], ["emergence step", fmt(emerged)], ["peak step", fmt(col.peak_step[i])],
        ["lifetime", col.lifetime[i] + " snapshots"], ["complexity (context depth)", fmt(col.complexity[i])],
        ["complexity (LLM rubric)", fmt(col.llm_complexity[i])], ["density", fmt(100 * col.density[i], 2) + "% of positions (any snapshot)"],
        ["density at the last snapshot", fmt(100 * col.final_density[i], 2) + "%"], ["peak decoder norm", fmt(col.peak_norm[i])]
      ].map(function (p) { return "<span><b>" + esc(p[0]) + "</b>: " + esc(p[1]) + "</span>"; }).join("");
      var tasks = index.tasks.map(function (t) {
        var a = d.attribution[t];
        return a && a[1] !== null ? "<span>" + esc(t) + " (rank " + (a[1] + 1) + ", " + fmt(a[0]) + ")</span>" : "";
      }).join("");
      pane.innerHTML = "<h2>Feature " + f + "</h2>" + '<div class="facts">' + facts + "</div>" +
        (index.tasks.length ? '<div class="tasks"><b>circuit tasks</b> (top ' + index.task_top_n + " by attribution at the last snapshot): " + (tasks || '<span class="muted">none</span>') + "</div>" : "") +
        "<h3>Decoder norm ‖W<sub>D</sub>‖ over training (dashed: " + esc(formedLabel.split(" (")[0]) + ")</h3>" +
        trajectory(d.norms, steps, d.formed_index) +
        "<h3>Top contexts at the last snapshot (step " + steps[steps.length - 1] + ")</h3>" + contextsHtml(d.final, vocab) +
        "<h3>Top contexts at the snapshot " + esc(formedLabel) + "</h3>" + contextsHtml(d.formed, vocab) +
        '<p class="muted">' + esc(d.complexity_explanation) + (d.llm_explanation ? "<br>LLM: " + esc(d.llm_explanation) : "") + "</p>";
      pane.setAttribute("data-feature", String(f));
    }, function (error) {
      pane.innerHTML = "<h2>Feature " + f + "</h2><p>" + esc(error.message) + "</p>";
    });
  }

  // ------------------------------------------------------------------ wiring
  function setDirection(direction) {
    var b = $("direction");
    b.setAttribute("data-direction", direction);
    b.textContent = direction === "asc" ? "↑ ascending" : "↓ descending";
  }

  function start(data) {
    index = data; col = data.columns; n = col.feature.length;
    document.title = data.title;
    $("title").textContent = data.title;
    data.categories.forEach(function (c, k) {
      if (col.category.indexOf(k) >= 0) $("category").insertAdjacentHTML("beforeend", '<option value="' + k + '">' + esc(c) + "</option>");
    });
    data.tasks.forEach(function (t, k) { $("task").insertAdjacentHTML("beforeend", '<option value="' + k + '">' + esc(t) + "</option>"); });
    if (!data.tasks.length) $("task-label").hidden = true;
    var timer = null;
    $("search").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { search($("search").value.trim()); }, 150);
    });
    $("sort").addEventListener("change", refresh);
    $("direction").addEventListener("click", function () {
      setDirection($("direction").getAttribute("data-direction") === "asc" ? "desc" : "asc");
      refresh();
    });
    ["category", "task"].forEach(function (id) { $(id).addEventListener("change", refresh); });
    Array.prototype.forEach.call(document.querySelectorAll("#filters input"), function (el) { el.addEventListener("input", refresh); });
    Array.prototype.forEach.call(document.querySelectorAll("#list th[data-sort]"), function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-sort");
        if ($("sort").value === key) setDirection($("direction").getAttribute("data-direction") === "asc" ? "desc" : "asc");
        $("sort").value = key;
        refresh();
      });
    });
    $("more").addEventListener("click", more);
    $("rows").addEventListener("click", function (event) {
      var row = event.target.closest("tr[data-feature]");
      if (row) { event.preventDefault(); location.hash = "feature-" + row.getAttribute("data-feature"); }
    });
    window.addEventListener("hashchange", showFeature);
    refresh();
    $("status").textContent = n + " live features (" + data.n_dead + " dead) · " + data.steps.length + " snapshots, steps " + data.steps[0] + "–" + data.steps[data.steps.length - 1];
    window.crosslibExplorer.ready = true;
    if (window.performance && performance.mark) performance.mark("explorer-ready");
    document.body.setAttribute("data-ready", "1");
    showFeature();
  }

  load("index").then(start, function (error) {
    $("status").textContent = error.message + " (the explorer's data files must sit in explorer-data/ beside this page)";
  });
})();
