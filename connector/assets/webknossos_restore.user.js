// ==UserScript==
// @name         emrestore: restore region (webKnossos)
// @namespace    https://github.com/emrestore
// @version      0.1.0
// @description  Restore the region at the current position with an emrestore diffusion model (shift+R or the button); progress as toasts.
// @match        https://webknossos.org/*
// @match        https://*.webknossos.org/*
// @grant        none
// ==/UserScript==
//
// Uses the webKnossos front-end scripting API, version 3 (window.webknossos.apiReady(3)):
//   api.tracing.getCameraPosition(), api.data.getLayerNames(), api.data.getBoundingBox(layer),
//   api.utils.registerKeyHandler(key, handler), api.utils.showToast(type, message, timeout).
// Talks to the emrestore HTTP bridge (`emrestore bridge`): POST /v1/restore-region, GET /v1/models,
// GET /v1/jobs/{id}/events (server-sent events, read with fetch so the bearer token can be sent).
//
// Configuration (merged in this order): DEFAULTS below, window.EMRESTORE_CONFIG (set it in a
// second user script or the console), localStorage["emrestore.config"] (JSON). Keys:
//   bridgeUrl  URL of the bridge, e.g. "https://emrestore.lab.org"      (required)
//   token      the bridge's bearer token                                 (required)
//   source     precomputed URL the service reads for this dataset (e.g. "gs://lab/em/raw"), or
//   sources    {"<webKnossos layer name>": "<precomputed URL>", …}
//   layer      the webKnossos layer to restore (default: the first layer)
//   model      model name on the server (default: the server's first model)
//   block      [x, y, z] voxels restored around the position (default [128, 128, 8])
//   samples, steps   sampling settings (samples ≥ 2 also writes an uncertainty layer)
//   registerIn ["lab-wk"] — NAMES of registration targets the operator configured for the service
//              (emrestore serve/bridge --targets); the service adds the restored layer to the dataset
//              when the job succeeds. URLs, tokens and options live only in that configuration.
//   key        key combination (default "shift + r")
(function () {
  "use strict";

  var DEFAULTS = {
    bridgeUrl: "http://127.0.0.1:8080",
    token: "",
    source: "",
    sources: {},
    layer: "",
    model: "",
    block: [128, 128, 8],
    samples: 1,
    steps: 0,
    registerIn: [],
    key: "shift + r",
    button: true
  };

  function loadConfig() {
    var cfg = Object.assign({}, DEFAULTS, window.EMRESTORE_CONFIG || {});
    try {
      var stored = window.localStorage && window.localStorage.getItem("emrestore.config");
      if (stored) Object.assign(cfg, JSON.parse(stored));
    } catch (e) { /* ignore unreadable local settings */ }
    cfg.bridgeUrl = String(cfg.bridgeUrl || "").replace(/\/+$/, "");
    return cfg;
  }

  function BridgeError(status, body) {
    var b = body || {};
    this.status = status;
    this.error = b.error || "HTTP_" + status;
    this.field = b.field || "";
    this.message = (status ? status + " " : "") + this.error + (b.field ? " (" + b.field + ")" : "") +
      ": " + (b.message || "request failed");
  }
  BridgeError.prototype = Object.create(Error.prototype);

  function request(cfg, method, path, body) {
    var init = { method: method, headers: { "Authorization": "Bearer " + cfg.token } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(cfg.bridgeUrl + path, init).catch(function (e) {
      throw new BridgeError(0, { error: "NETWORK", message: "cannot reach the emrestore bridge at " + cfg.bridgeUrl +
        " (is it running, and is this page's origin " + window.location.origin + " in its --allow-origin list?)" });
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
        if (!resp.ok) throw new BridgeError(resp.status, data);
        return data;
      });
    });
  }

  // Server-sent events over fetch (EventSource cannot send an Authorization header).
  function streamEvents(cfg, jobId, onEvent) {
    return fetch(cfg.bridgeUrl + "/v1/jobs/" + encodeURIComponent(jobId) + "/events", {
      headers: { "Authorization": "Bearer " + cfg.token, "Accept": "text/event-stream" }
    }).then(function (resp) {
      if (!resp.ok) {
        return resp.json().catch(function () { return {}; }).then(function (b) { throw new BridgeError(resp.status, b); });
      }
      var reader = resp.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      var last = null;
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) return last;
          buffer += decoder.decode(chunk.value, { stream: true });
          var idx;
          while ((idx = buffer.indexOf("\n\n")) >= 0) {
            var block = buffer.slice(0, idx);
            buffer = buffer.slice(idx + 2);
            var event = "message", data = [];
            block.split("\n").forEach(function (line) {
              if (line.indexOf("event:") === 0) event = line.slice(6).trim();
              else if (line.indexOf("data:") === 0) data.push(line.slice(5).replace(/^ /, ""));
            });
            if (!data.length) continue;
            var payload = JSON.parse(data.join("\n"));
            last = { event: event, data: payload };
            onEvent(event, payload);
            if (event === "done" || event === "error") {
              reader.cancel();
              return last;
            }
          }
          return pump();
        });
      }
      return pump();
    });
  }

  function regionAround(position, bbox, block) {
    var start = [], stop = [];
    for (var i = 0; i < 3; i++) {
      var lo = Math.floor(bbox[0][i]), hi = Math.ceil(bbox[1][i]);
      var b = Math.min(Math.max(1, Math.round(block[i])), hi - lo);
      var s = Math.floor(position[i] - b / 2);
      s = Math.max(lo, Math.min(s, hi - b));
      start.push(s);
      stop.push(s + b);
    }
    return { start: start, stop: stop };
  }

  function install(api) {
    var cfg = loadConfig();
    var state = { busy: false, lastJob: null, lastResult: null, toast: null };

    function toast(type, message, timeout) {
      if (state.toast) { try { state.toast(); } catch (e) { /* already gone */ } }
      state.toast = api.utils.showToast(type, message, timeout === undefined ? 0 : timeout);
      return state.toast;
    }

    function chooseModel() {
      if (cfg.model) return Promise.resolve(cfg.model);
      return request(cfg, "GET", "/v1/models").then(function (body) {
        var models = (body && body.models) || [];
        if (!models.length) throw new BridgeError(0, { error: "NO_MODELS", message: "the server lists no models; set EMRESTORE_CONFIG.model" });
        return models[0].name;
      });
    }

    function restoreRegion() {
      if (state.busy) {
        toast("warning", "emrestore: a restoration is already running (" + (state.lastJob || "starting") + ")", 4000);
        return Promise.resolve(null);
      }
      if (!cfg.token) {
        toast("error", "emrestore: no bridge token configured (EMRESTORE_CONFIG.token)", 0);
        return Promise.resolve(null);
      }
      var layers = api.data.getLayerNames();
      var layer = cfg.layer || layers[0];
      var source = (cfg.sources && cfg.sources[layer]) || cfg.source;
      if (!source) {
        toast("error", "emrestore: no precomputed source configured for layer '" + layer + "' (EMRESTORE_CONFIG.source)", 0);
        return Promise.resolve(null);
      }
      var region = regionAround(api.tracing.getCameraPosition(), api.data.getBoundingBox(layer), cfg.block);
      state.busy = true;
      toast("info", "emrestore: starting restoration of " + JSON.stringify(region.start) + "–" + JSON.stringify(region.stop) + " …", 0);
      return chooseModel().then(function (model) {
        return request(cfg, "POST", "/v1/restore-region", {
          source: source, model: model, region: region, samples: cfg.samples, steps: cfg.steps,
          register_in: cfg.registerIn || []
        });
      }).then(function (created) {
        var job = created.job;
        state.lastJob = job.job_id;
        var short = job.job_id.slice(-8);
        toast("info", "emrestore: job " + short + " " + job.state + " (" + job.blocks_done + "/" + job.blocks_total + " blocks)", 0);
        return streamEvents(cfg, job.job_id, function (event, data) {
          if (event === "progress") {
            var pct = data.blocks_total ? Math.round(100 * data.progress) + "%" : "";
            toast("info", "emrestore: job " + short + " " + data.state + " " + data.blocks_done + "/" + data.blocks_total + " blocks " + pct, 0);
          }
        }).then(function (last) {
          if (!last || last.event === "error") {
            var err = last ? last.data : { error: "STREAM", message: "the event stream ended early" };
            throw new BridgeError(0, err);
          }
          var final = last.data;
          state.lastResult = { job: final, output: created.output, uncertainty: created.uncertainty_output };
          if (final.state === "SUCCEEDED") {
            var reg = (final.events || []).map(function (e) { return typeof e === "string" ? e : (e.message || ""); })
              .filter(function (e) { return /(webknossos|neuroglancer|catmaid):/.test(e); });
            toast("success", "emrestore: job " + short + " SUCCEEDED — restored layer " + created.output +
              (reg.length ? " — " + reg.join(" — ") : ""), 0);
          } else {
            toast("error", "emrestore: job " + short + " " + final.state + ": " + final.message, 0);
          }
          return state.lastResult;
        });
      }).catch(function (e) {
        state.lastResult = { error: e.message || String(e) };
        toast("error", "emrestore: " + (e.message || String(e)), 0);
        return null;
      }).then(function (r) {
        state.busy = false;
        return r;
      });
    }

    var handler = api.utils.registerKeyHandler(cfg.key, function () { restoreRegion(); });
    if (cfg.button && document.body) {
      var btn = document.createElement("button");
      btn.id = "emrestore-restore-button";
      btn.textContent = "Restore region (emrestore)";
      btn.title = "Restore the region around the current position (" + cfg.key + ")";
      btn.style.cssText = "position:fixed;right:12px;bottom:12px;z-index:10000;padding:6px 10px;";
      btn.addEventListener("click", function () { restoreRegion(); });
      document.body.appendChild(btn);
    }
    window.emrestore = {
      ready: true, config: cfg, state: state, key: cfg.key,
      restoreRegion: restoreRegion, unregister: function () { handler.unregister(); }
    };
  }

  if (!window.webknossos || typeof window.webknossos.apiReady !== "function") {
    console.warn("emrestore: window.webknossos.apiReady is not available on this page");
    return;
  }
  window.webknossos.apiReady(3).then(install);
})();
