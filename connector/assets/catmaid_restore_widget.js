/* emrestore: "Restore region" widget for CATMAID (front-end extension).
 *
 * Install: copy this file into CATMAID's STATIC_EXTENSION_ROOT and add it to
 * STATIC_EXTENSION_FILES in settings.py (served under STATIC_EXTENSION_URL, default /staticext/);
 * CATMAID loads it after its own files. Open it with the widget dialog (Ctrl+Space) → key
 * "emrestore-restore". Follows CATMAID 2021.12.21's front-end API: CATMAID.registerWidget,
 * InstanceRegistry, getWidgetConfiguration (controls + content), project.focusedStackViewer /
 * project.getStackViewers(), stackViewer.primaryStack, projectCoordinates(), viewWidth/viewHeight/
 * scale, stack.projectToStackX/Y/Z, stack.mirrors (image_base, tile_source_type),
 * CATMAID.msg / CATMAID.warn / CATMAID.error.
 *
 * "Restore current view" restores the part of the focused stack that is on screen (capped at
 * `block`, z ± block[2]/2 sections around the current section) through the emrestore HTTP bridge
 * (`emrestore bridge`): POST /v1/restore-region, then progress from GET /v1/jobs/{id}/events
 * (server-sent events read with fetch so the bearer token can be sent).
 *
 * Configuration (controls of the widget; defaults from CATMAID.emrestoreConfig and
 * localStorage["emrestore.config"]):
 *   bridgeUrl, token   the bridge and its bearer token
 *   source             precomputed URL the service reads; default: the stack's tile source 14
 *                      mirror (image_base without "/%SCALE_DATASET%/…"), rewritten by sourceMap
 *   sourceMap          {"<public URL prefix>": "<service URL prefix>"} (e.g. https → gs://)
 *   model, block [x, y, z], samples, steps, registerIn (NAMES of registration targets the operator
 *                      configured for the service, e.g. ["lab-catmaid"]; nothing else is accepted)
 *
 * Coordinates: CATMAID's stack coordinate 0 is the Precomputed layer's voxel_offset (tile source 14
 * reads from there), so the region sent is the stack region plus the offset (metadata.voxelOffset,
 * else the layer's info file).
 */
(function (CATMAID) {
  "use strict";

  var DEFAULTS = {
    bridgeUrl: "http://127.0.0.1:8080", token: "", source: "", sourceMap: {}, model: "",
    block: [256, 256, 8], samples: 1, steps: 0, registerIn: []
  };
  var PRECOMPUTED_TILE_SOURCE = 14;

  function loadConfig() {
    var cfg = Object.assign({}, DEFAULTS, CATMAID.emrestoreConfig || {});
    try {
      var stored = window.localStorage && window.localStorage.getItem("emrestore.config");
      if (stored) Object.assign(cfg, JSON.parse(stored));
    } catch (e) { /* ignore */ }
    return cfg;
  }

  function bridgeError(status, body) {
    var b = body || {};
    var e = new Error((status ? status + " " : "") + (b.error || "ERROR") + (b.field ? " (" + b.field + ")" : "") +
      ": " + (b.message || "request failed"));
    e.status = status; e.body = b;
    return e;
  }

  function request(cfg, method, path, body) {
    var init = { method: method, headers: { "Authorization": "Bearer " + cfg.token } };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    var base = String(cfg.bridgeUrl).replace(/\/+$/, "");
    return fetch(base + path, init).catch(function () {
      throw bridgeError(0, { error: "NETWORK", message: "cannot reach the emrestore bridge at " + base +
        " (running? is " + window.location.origin + " in its --allow-origin list?)" });
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
        if (!resp.ok) throw bridgeError(resp.status, data);
        return data;
      });
    });
  }

  function streamEvents(cfg, jobId, onEvent) {
    var base = String(cfg.bridgeUrl).replace(/\/+$/, "");
    return fetch(base + "/v1/jobs/" + encodeURIComponent(jobId) + "/events", {
      headers: { "Authorization": "Bearer " + cfg.token, "Accept": "text/event-stream" }
    }).then(function (resp) {
      if (!resp.ok) return resp.json().catch(function () { return {}; }).then(function (b) { throw bridgeError(resp.status, b); });
      var reader = resp.body.getReader(), decoder = new TextDecoder(), buffer = "", last = null;
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) return last;
          buffer += decoder.decode(chunk.value, { stream: true });
          var idx;
          while ((idx = buffer.indexOf("\n\n")) >= 0) {
            var block = buffer.slice(0, idx); buffer = buffer.slice(idx + 2);
            var event = "message", data = [];
            block.split("\n").forEach(function (line) {
              if (line.indexOf("event:") === 0) event = line.slice(6).trim();
              else if (line.indexOf("data:") === 0) data.push(line.slice(5).replace(/^ /, ""));
            });
            if (!data.length) continue;
            last = { event: event, data: JSON.parse(data.join("\n")) };
            onEvent(last.event, last.data);
            if (event === "done" || event === "error") { reader.cancel(); return last; }
          }
          return pump();
        });
      }
      return pump();
    });
  }

  function sourceForStack(cfg, stack) {
    var url = cfg.source;
    if (!url) {
      var mirror = (stack.mirrors || []).filter(function (m) {
        return Number(m.tile_source_type) === PRECOMPUTED_TILE_SOURCE;
      })[0];
      if (!mirror) return null;
      url = String(mirror.image_base).replace(/\/?%SCALE_DATASET%.*$/, "").replace(/\/+$/, "");
      url = url.replace(/^precomputed:\/\//, "");
    }
    Object.keys(cfg.sourceMap || {}).sort(function (a, b) { return b.length - a.length; }).some(function (prefix) {
      if (url === prefix || url.indexOf(prefix.replace(/\/+$/, "") + "/") === 0) {
        url = cfg.sourceMap[prefix].replace(/\/+$/, "") + url.slice(prefix.replace(/\/+$/, "").length);
        return true;
      }
      return false;
    });
    return url;
  }

  /** The layer's voxel_offset: CATMAID's stack coordinate 0 is this voxel of the Precomputed layer
   * (tile source 14 reads from the offset). From the stack's metadata.voxelOffset (emrestore and
   * most importers write it), else from the layer's info file next to the mirror URL. */
  function layerOffset(stack) {
    var meta = stack.metadata;
    if (typeof meta === "string") { try { meta = JSON.parse(meta); } catch (e) { meta = null; } }
    if (meta && Array.isArray(meta.voxelOffset) && meta.voxelOffset.length === 3) {
      return Promise.resolve(meta.voxelOffset.map(Number));
    }
    var mirror = (stack.mirrors || []).filter(function (m) {
      return Number(m.tile_source_type) === PRECOMPUTED_TILE_SOURCE;
    })[0];
    if (!mirror) return Promise.resolve([0, 0, 0]);
    var layer = String(mirror.image_base).replace(/\/?%SCALE_DATASET%.*$/, "").replace(/\/+$/, "")
      .replace(/^precomputed:\/\//, "").replace(/^gs:\/\//, "https://storage.googleapis.com/");
    return fetch(layer + "/info").then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (info) {
      var off = (info.scales && info.scales[0] && info.scales[0].voxel_offset) || [0, 0, 0];
      return off.map(Number);
    }).catch(function (e) {
      throw new Error("cannot read the layer's voxel offset from " + layer + "/info (" + e.message + ")");
    });
  }

  /** The on-screen part of the focused stack (stack voxels), capped at cfg.block. */
  function currentViewRegion(cfg, stackViewer) {
    var stack = stackViewer.primaryStack;
    var p = stackViewer.projectCoordinates();
    var centre = [stack.projectToStackX(p.z, p.y, p.x), stack.projectToStackY(p.z, p.y, p.x),
                  stack.projectToStackZ(p.z, p.y, p.x)];
    var scale = stackViewer.scale || 1;
    var extent = [Math.min(cfg.block[0], Math.ceil((stackViewer.viewWidth || cfg.block[0]) / scale)),
                  Math.min(cfg.block[1], Math.ceil((stackViewer.viewHeight || cfg.block[1]) / scale)),
                  cfg.block[2]];
    var dims = [stack.dimension.x, stack.dimension.y, stack.dimension.z];
    var start = [], stop = [];
    for (var i = 0; i < 3; i++) {
      var b = Math.max(1, Math.min(extent[i], dims[i]));
      var s = Math.max(0, Math.min(Math.floor(centre[i] - b / 2), dims[i] - b));
      start.push(s); stop.push(s + b);
    }
    return { start: start, stop: stop };
  }

  var RestoreWidget = function (options) {
    this.widgetID = this.registerInstance();
    this.idPrefix = "emrestore-restore-" + this.widgetID + "-";
    this.config = loadConfig();
    this.busy = false;
    this.lastResult = null;
  };
  RestoreWidget.prototype = {};
  // Mix in CATMAID's InstanceRegistry (inherited methods too, like jQuery.extend does).
  (function (registry) { for (var k in registry) RestoreWidget.prototype[k] = registry[k]; })(new InstanceRegistry());

  RestoreWidget.prototype.getName = function () { return "emrestore restore " + this.widgetID; };
  RestoreWidget.prototype.destroy = function () { this.unregisterInstance(); };

  RestoreWidget.prototype.getWidgetConfiguration = function () {
    var self = this;
    return {
      controlsID: this.idPrefix + "controls",
      createControls: function (controls) {
        function field(label, key, type) {
          var wrap = document.createElement("label");
          wrap.appendChild(document.createTextNode(label + " "));
          var input = document.createElement("input");
          input.type = type || "text";
          input.id = self.idPrefix + key;
          input.value = Array.isArray(self.config[key]) ? self.config[key].join(",") : (self.config[key] || "");
          input.addEventListener("change", function () {
            var v = input.value.trim();
            if (key === "block") v = v.split(",").map(Number);
            else if (key === "samples" || key === "steps") v = Number(v) || 0;
            self.config[key] = v;
          });
          wrap.appendChild(input);
          controls.appendChild(wrap);
          return input;
        }
        field("Bridge", "bridgeUrl");
        field("Token", "token", "password");
        self.modelSelect = document.createElement("select");
        self.modelSelect.id = self.idPrefix + "model";
        self.modelSelect.addEventListener("change", function () { self.config.model = self.modelSelect.value; });
        var ml = document.createElement("label");
        ml.appendChild(document.createTextNode(" Model "));
        ml.appendChild(self.modelSelect);
        controls.appendChild(ml);
        field(" Block x,y,z", "block");
        field(" Samples", "samples", "number");
        var button = document.createElement("button");
        button.id = self.idPrefix + "restore";
        button.className = "emrestore-restore";
        button.textContent = "Restore current view";
        button.addEventListener("click", function () { self.restoreCurrentView(); });
        controls.appendChild(button);
      },
      contentID: this.idPrefix + "content",
      createContent: function (content) {
        self.progress = document.createElement("progress");
        self.progress.max = 1; self.progress.value = 0;
        self.statusLine = document.createElement("div");
        self.statusLine.className = "emrestore-status";
        self.statusLine.textContent = "Ready.";
        content.appendChild(self.progress);
        content.appendChild(self.statusLine);
      },
      init: function () { self.refreshModels(); },
      helpText: "Restores the visible part of the focused stack with an emrestore model and shows the progress."
    };
  };

  RestoreWidget.prototype.setStatus = function (text, fraction) {
    if (this.statusLine) this.statusLine.textContent = text;
    if (this.progress && fraction !== undefined) this.progress.value = fraction;
  };

  RestoreWidget.prototype.refreshModels = function () {
    var self = this;
    if (!this.config.token) { this.setStatus("Set the bridge token to list models."); return Promise.resolve([]); }
    return request(this.config, "GET", "/v1/models").then(function (body) {
      var models = (body && body.models) || [];
      if (self.modelSelect) {
        self.modelSelect.innerHTML = "";
        models.forEach(function (m) {
          var o = document.createElement("option"); o.value = m.name;
          o.textContent = m.name + " (" + m.task + " ×" + m.factor + ")";
          self.modelSelect.appendChild(o);
        });
        if (self.config.model) self.modelSelect.value = self.config.model;
        else if (models.length) self.config.model = models[0].name;
      }
      return models;
    }).catch(function (e) { self.setStatus("Models: " + e.message); CATMAID.warn("emrestore: " + e.message); return []; });
  };

  RestoreWidget.prototype.restoreCurrentView = function () {
    var self = this, cfg = this.config;
    if (this.busy) { CATMAID.warn("emrestore: a restoration is already running"); return Promise.resolve(null); }
    var sv = project.focusedStackViewer || project.getStackViewers()[0];
    if (!sv) { CATMAID.warn("emrestore: open a stack first"); return Promise.resolve(null); }
    var source = sourceForStack(cfg, sv.primaryStack);
    if (!source) {
      CATMAID.error("emrestore: stack '" + sv.primaryStack.title + "' has no Neuroglancer precomputed (tile source 14) mirror; set a source");
      return Promise.resolve(null);
    }
    var inStack = currentViewRegion(cfg, sv), region = null;
    this.busy = true;
    var modelP = cfg.model ? Promise.resolve(cfg.model) : this.refreshModels().then(function (ms) {
      if (!ms.length) throw bridgeError(0, { error: "NO_MODELS", message: "the server lists no models" });
      return ms[0].name;
    });
    return layerOffset(sv.primaryStack).then(function (off) {
      // stack voxels → the layer's absolute voxels (what the service's region means)
      region = { start: inStack.start.map(function (v, i) { return v + off[i]; }),
                 stop: inStack.stop.map(function (v, i) { return v + off[i]; }) };
      self.setStatus("Starting restoration of " + JSON.stringify(region.start) + "–" + JSON.stringify(region.stop) + " …", 0);
      return modelP;
    }).then(function (model) {
      return request(cfg, "POST", "/v1/restore-region", {
        source: source, model: model, region: region, samples: cfg.samples, steps: cfg.steps,
        register_in: cfg.registerIn || []
      });
    }).then(function (created) {
      var job = created.job, short = job.job_id.slice(-8);
      CATMAID.msg("emrestore", "Job " + short + " started: " + JSON.stringify(region.start) + "–" + JSON.stringify(region.stop));
      return streamEvents(cfg, job.job_id, function (event, data) {
        if (event === "progress") {
          self.setStatus("Job " + short + ": " + data.state + " " + data.blocks_done + "/" + data.blocks_total + " blocks", data.progress);
        }
      }).then(function (last) {
        if (!last || last.event === "error") throw bridgeError(0, last ? last.data : { error: "STREAM", message: "event stream ended early" });
        var final = last.data;
        self.lastResult = { job: final, output: created.output, uncertainty: created.uncertainty_output };
        if (final.state === "SUCCEEDED") {
          self.setStatus("Job " + short + " SUCCEEDED: " + created.output, 1);
          var reg = (final.events || []).map(function (e) { return typeof e === "string" ? e : (e.message || ""); })
            .filter(function (e) { return /catmaid:/.test(e); });
          CATMAID.msg("emrestore", "Job " + short + " SUCCEEDED — restored layer " + created.output + (reg.length ? " — " + reg.join(" — ") : ""));
        } else {
          self.setStatus("Job " + short + " " + final.state + ": " + final.message);
          CATMAID.error("emrestore: job " + short + " " + final.state + ": " + final.message);
        }
        return self.lastResult;
      });
    }).catch(function (e) {
      self.lastResult = { error: e.message };
      self.setStatus("Error: " + e.message);
      CATMAID.error("emrestore: " + e.message);
      return null;
    }).then(function (r) { self.busy = false; return r; });
  };

  CATMAID.EmrestoreRestoreWidget = RestoreWidget;

  CATMAID.registerWidget({
    name: "emrestore: restore region",
    description: "Restore the visible region with an emrestore diffusion model",
    key: "emrestore-restore",
    creator: RestoreWidget
  });
})(CATMAID);
