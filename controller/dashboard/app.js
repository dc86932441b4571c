/* greenfleet dashboard: plain JS, hash routing, polls the read-only HTTP API every 2 s and
 * updates the page in place (table rows are kept by key, so nothing flickers or loses focus).
 *
 * Routes: #/fleet  #/devices/<id>  #/models  #/rollouts  #/rollouts/<id>  #/energy
 * A token (needed only when the API is reached from another machine) is taken once from
 * ?token=... in the page address and kept for the tab's session.
 */
(function () {
  "use strict";

  const API = "/api/v1";
  const POLL_MS = 2000;
  const ROLLOUT_DETAILS = 8; // the newest rollouts shown with waves and gates
  const view = document.getElementById("view");

  // ------------------------------------------------------------------------------- helpers

  /* h("tag", {attrs}, ...children): a DOM element; attrs starting with "on" are listeners. */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "style")
        Object.assign(node.style, v); // CSSOM: allowed by a strict CSP
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  /* Replace a node's children only when what they would show differs (keeps focus, no flicker). */
  function fill(node, ...children) {
    const next = h("div", {}, ...children);
    if (next.innerHTML !== node.innerHTML) node.replaceChildren(...next.childNodes);
    return node;
  }

  /* Keep one <tr> per key: update cells that changed, add new rows, drop vanished ones. */
  function syncRows(tbody, items, key, cells, rowAttrs, emptyText) {
    if (!items.length && emptyText) {
      const cols = tbody.parentElement.querySelectorAll("thead th").length || 1;
      items = [{ __empty: true }];
      key = () => "__empty";
      cells = () => h("td", { colspan: cols, class: "empty-note" }, emptyText);
      rowAttrs = () => ({ "data-empty": "true" });
    }
    const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
    const seen = new Set();
    let before = tbody.firstElementChild;
    for (const item of items) {
      const k = String(key(item));
      seen.add(k);
      let tr = old.get(k);
      const fresh = h("tr", { ...(rowAttrs ? rowAttrs(item) : {}), "data-key": k }, cells(item));
      if (!tr) {
        tr = fresh;
      } else {
        for (const a of fresh.getAttributeNames()) {
          if (tr.getAttribute(a) !== fresh.getAttribute(a)) tr.setAttribute(a, fresh.getAttribute(a));
        }
        const now = [...fresh.children];
        const cur = [...tr.children];
        if (now.length !== cur.length) tr.replaceChildren(...now);
        else
          now.forEach((td, i) => {
            if (td.outerHTML !== cur[i].outerHTML) tr.replaceChild(td, cur[i]);
          });
      }
      if (tr !== before) tbody.insertBefore(tr, before);
      before = tr.nextElementSibling;
    }
    for (const [k, tr] of old) if (!seen.has(k)) tr.remove();
  }

  function table(id, caption, columns, extra) {
    return h(
      "table",
      { id, "data-testid": id, class: "data", ...(extra || {}) },
      h("caption", {}, caption),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          columns.map((c) =>
            h("th", { scope: "col", class: c.num ? "num" : null, title: c.title || null }, c.label),
          ),
        ),
      ),
      h("tbody", {}),
    );
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);

  function fixed(v, digits) {
    v = num(v);
    return v === null ? "–" : v.toFixed(digits);
  }

  function sig(v, digits) {
    v = num(v);
    if (v === null) return "–";
    if (v === 0) return "0";
    if (Math.abs(v) >= 10 ** digits) return Math.round(v).toLocaleString();
    return String(Number(v.toPrecision(digits || 3)));
  }

  function pct(v, digits) {
    v = num(v);
    return v === null ? "–" : `${(v * 100).toFixed(digits === undefined ? 1 : digits)} %`;
  }

  /* kWh with a readable unit: a test fleet spends milliwatt-hours, a plant kilowatt-hours. */
  function energyText(kwh) {
    kwh = num(kwh);
    if (kwh === null) return "–";
    if (kwh === 0) return "0 kWh";
    const wh = kwh * 1000;
    if (kwh >= 1) return `${sig(kwh, 3)} kWh`;
    if (wh >= 1) return `${sig(wh, 3)} Wh`;
    return `${sig(wh * 1000, 3)} mWh`;
  }

  /* A duration as people say it, in the largest unit it fills (controller.output.duration_text
   * words it the same for the CLI): 11520 -> "3.2 h". */
  const DURATION_UNITS = [
    ["y", 365 * 86400],
    ["d", 86400],
    ["h", 3600],
    ["min", 60],
  ];

  function durationText(seconds) {
    seconds = num(seconds);
    if (seconds === null) return "–";
    let [value, unit] = [seconds, "s"];
    const fits = DURATION_UNITS.find(([, size]) => seconds >= size);
    if (fits) [value, unit] = [seconds / fits[1], fits[0]];
    if (value < 9.95) return `${value.toFixed(1).replace(/\.0$/, "")} ${unit}`;
    return `${Math.round(value).toLocaleString("en")} ${unit}`;
  }

  /* A report row's payback: "paid" once the period's saving covers its build, else how long
   * that takes at the period's inference rate; "–" when it never does or the build is unknown. */
  const paybackText = (r) => (r.paid_back ? "paid" : durationText(r.payback_s));

  function massText(kg) {
    kg = num(kg);
    if (kg === null) return "–";
    if (kg === 0) return "0 g";
    if (kg >= 1) return `${sig(kg, 3)} kg`;
    if (kg >= 0.001) return `${sig(kg * 1000, 3)} g`;
    return `${sig(kg * 1e6, 3)} mg`;
  }

  function bytesText(n) {
    n = num(n);
    if (n === null) return "–";
    if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(2)} MiB`;
    return `${(n / 1024).toFixed(0)} KiB`;
  }

  function parseTime(s) {
    if (!s) return null;
    const t = Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(s) ? s : `${s}Z`);
    return isNaN(t) ? null : t;
  }

  function ago(s) {
    const t = parseTime(s);
    if (t === null) return "never";
    const sec = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (sec < 60) return `${sec} s ago`;
    if (sec < 3600) return `${Math.floor(sec / 60)} min ago`;
    if (sec < 86400) return `${Math.floor(sec / 3600)} h ago`;
    return `${Math.floor(sec / 86400)} d ago`;
  }

  function clock(s) {
    const t = parseTime(s);
    return t === null ? "–" : new Date(t).toLocaleString();
  }

  /* "name:1.0.0+int8-dynamic" -> {model: "name:1.0.0", variant: "int8-dynamic"} */
  function splitModel(ref) {
    if (!ref) return { model: null, variant: null };
    const i = ref.indexOf("+");
    return i < 0
      ? { model: ref, variant: "(source)" }
      : { model: ref.slice(0, i), variant: ref.slice(i + 1) };
  }

  /* Whether a device still has to reach its desired model. A desired NAME:VERSION is planned
   * (the controller picks the variant), so any variant of that version is reaching it. */
  function isPending(d) {
    if (!d.desired_model || d.desired_model === d.active_model) return false;
    if (d.desired_model.includes("+")) return true;
    return splitModel(d.active_model).model !== d.desired_model;
  }

  function badge(text, kind, testid) {
    return h("span", { class: `badge badge-${kind || text}`, "data-testid": testid || null }, text);
  }

  function onlineBadge(online, revoked) {
    if (revoked) return badge("revoked", "revoked", "online-state");
    return badge(online ? "online" : "offline", online ? "online" : "offline", "online-state");
  }

  function tierBadge(tier) {
    if (!tier) return "–";
    return badge(
      tier,
      tier === "active" ? "tier-active" : FALLBACK_TIERS.has(tier) ? "tier-fallback" : "tier-none",
      "tier",
    );
  }

  const FALLBACK_TIERS = new Set(["last_good", "fallback", "rules"]);
  const slug = (s) => String(s).replace(/[^A-Za-z0-9_-]+/g, "-");
  const enc = encodeURIComponent;

  // ----------------------------------------------------------------------------------- api

  const token = (() => {
    const q = new URLSearchParams(location.search).get("token");
    if (q) sessionStorage.setItem("greenfleet-token", q);
    return q || sessionStorage.getItem("greenfleet-token");
  })();

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(API + path, { headers, cache: "no-store" });
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
      } catch (e) {
        /* not JSON */
      }
      throw new ApiError(res.status, `${res.status} ${detail}`);
    }
    return res.json();
  }

  const list = (body) => (Array.isArray(body) ? body : []);

  // ---------------------------------------------------------------------------------- views

  const views = {};

  /* Fleet: every device, newest telemetry, click through to the device page. */
  views.fleet = {
    title: "Fleet",
    mount() {
      const filter = h("input", {
        id: "fleet-filter",
        type: "search",
        "data-testid": "fleet-filter",
        placeholder: "id, site, line, model…",
        oninput: () => views.fleet.render(),
      });
      return [
        h(
          "div",
          { class: "head" },
          h("h2", {}, "Fleet"),
          h("p", { id: "fleet-summary", "data-testid": "fleet-summary", class: "summary" }),
          h("label", { for: "fleet-filter", class: "filter" }, "Filter ", filter),
        ),
        table("fleet-table", "Devices with their newest telemetry window", [
          { label: "State" },
          { label: "Device" },
          { label: "Site" },
          { label: "Line" },
          { label: "Class" },
          { label: "Model" },
          { label: "Variant" },
          { label: "Tier" },
          { label: "Latency p95 (ms)", num: true },
          { label: "Power (W)", num: true, title: "mean power over the last telemetry window" },
          { label: "Energy / inference (mJ)", num: true },
          { label: "Last seen" },
        ]),
        h(
          "p",
          { id: "fleet-empty", class: "empty-note", hidden: true },
          "No devices yet: start an agent (greenfleet-agent run).",
        ),
      ];
    },
    async load() {
      return { rows: list(await api("/devices")) };
    },
    render(data) {
      if (data) this.data = data;
      const rows = (this.data ? this.data.rows : [])
        .slice()
        .sort((a, b) => String(a.id).localeCompare(String(b.id)));
      const q = (document.getElementById("fleet-filter").value || "").toLowerCase();
      const shown = rows.filter(
        (d) =>
          !q || JSON.stringify([d.id, d.labels, d.active_model, d.device_class]).toLowerCase().includes(q),
      );
      const online = rows.filter((d) => d.online).length;
      const fallback = rows.filter((d) => FALLBACK_TIERS.has(d.tier)).length;
      fill(
        document.getElementById("fleet-summary"),
        `${plural(rows.length, "device")}, `,
        h("strong", { "data-testid": "online-count" }, String(online)),
        " online",
        fallback ? `, ${fallback} on a fallback tier` : "",
        q ? ` (${shown.length} shown)` : "",
      );
      document.getElementById("fleet-empty").hidden = rows.length > 0;
      syncRows(
        document.querySelector("#fleet-table tbody"),
        shown,
        (d) => d.id,
        (d) => {
          const labels = d.labels || {};
          const m = splitModel(d.active_model);
          const pending = isPending(d)
            ? h("span", { class: "pending", title: "the desired model, on its way" }, ` → ${d.desired_model}`)
            : null;
          return [
            h("td", { "data-col": "online" }, onlineBadge(d.online, d.revoked)),
            h(
              "td",
              { "data-col": "id" },
              h("a", { href: `#/devices/${enc(d.id)}`, "data-testid": "device-link" }, d.id),
              d.pinned ? badge("pinned", "pinned") : null,
            ),
            h("td", { "data-col": "site" }, labels.site || "–"),
            h("td", { "data-col": "line" }, labels.line || "–"),
            h("td", { "data-col": "device_class" }, d.device_class || "–"),
            h("td", { "data-col": "model", "data-testid": "active-model" }, m.model || "none", pending),
            h("td", { "data-col": "variant" }, m.variant || "–"),
            h("td", { "data-col": "tier" }, tierBadge(d.tier)),
            h("td", { "data-col": "latency_p95_ms", class: "num" }, fixed(d.latency_p95_ms, 3)),
            h(
              "td",
              {
                "data-col": "power_w",
                class: "num",
                title: d.power_method ? `power ${d.power_method}` : null,
              },
              fixed(d.power_w, 2),
              d.power_method === "estimate" && num(d.power_w) !== null
                ? h("span", { class: "est", title: "estimated, not measured" }, " est")
                : null,
            ),
            h(
              "td",
              { "data-col": "energy_per_inference_j", class: "num" },
              num(d.energy_per_inference_j) === null ? "–" : sig(d.energy_per_inference_j * 1000, 3),
            ),
            h("td", { "data-col": "last_seen", title: clock(d.last_seen) }, ago(d.last_seen)),
          ];
        },
        (d) => ({
          "data-testid": "device-row",
          "data-device-id": d.id,
          "data-online": d.online ? "true" : "false",
          class: d.online ? "row-online" : "row-offline",
        }),
      );
    },
  };

  /* Device: facts, latency / power / energy charts over a chosen range, events, tier changes. */
  views.device = {
    title: "Device",
    minutes: 60,
    mount(id) {
      this.id = id;
      const range = h(
        "select",
        {
          id: "telemetry-range",
          "data-testid": "telemetry-range",
          onchange: (e) => {
            this.minutes = Number(e.target.value);
            refresh();
          },
        },
        [
          [15, "15 min"],
          [60, "1 hour"],
          [360, "6 hours"],
          [1440, "24 hours"],
        ].map(([v, t]) => h("option", { value: v, selected: v === this.minutes }, t)),
      );
      return [
        h("p", { class: "crumbs" }, h("a", { href: "#/fleet" }, "Fleet"), " / ", id),
        h(
          "div",
          { class: "head" },
          h("h2", { id: "device-title", "data-testid": "device-title" }, id),
          h("span", { id: "device-state" }),
          h("label", { for: "telemetry-range", class: "filter" }, "Range ", range),
        ),
        h("dl", { id: "device-facts", class: "facts", "data-testid": "device-facts" }),
        h(
          "div",
          { class: "charts" },
          h(
            "figure",
            { class: "chart-box" },
            h("figcaption", {}, "Latency (ms)"),
            h("div", { id: "latency-chart-box" }),
          ),
          h(
            "figure",
            { class: "chart-box" },
            h("figcaption", {}, "Power (W)"),
            h("div", { id: "power-chart-box" }),
          ),
          h(
            "figure",
            { class: "chart-box" },
            h("figcaption", {}, "Energy per inference (mJ)"),
            h("div", { id: "energy-chart-box" }),
          ),
        ),
        h(
          "p",
          { class: "legend" },
          h("span", { class: "key key-p95" }),
          "p95 ",
          h("span", { class: "key key-p50" }),
          "p50 ",
          h("span", { class: "key key-band" }),
          "answered from a fallback tier",
        ),
        h(
          "div",
          { class: "two" },
          h(
            "section",
            {},
            table("events-table", "Recent events", [
              { label: "Time" },
              { label: "Event" },
              { label: "Message" },
            ]),
          ),
          h(
            "section",
            {},
            table("tier-changes-table", "Recent tier changes", [
              { label: "Time" },
              { label: "From" },
              { label: "To" },
              { label: "Cause" },
            ]),
          ),
        ),
      ];
    },
    async load() {
      const id = enc(this.id);
      const [detail, telemetry] = await Promise.all([
        api(`/devices/${id}`),
        api(`/devices/${id}/telemetry?minutes=${this.minutes}&limit=500`),
      ]);
      return { detail, telemetry: list(telemetry) };
    },
    render(data) {
      const d = data.detail;
      const m = splitModel(d.active_model);
      fill(
        document.getElementById("device-state"),
        onlineBadge(d.online, d.revoked),
        " ",
        tierBadge(d.tier),
        d.pinned ? badge("pinned", "pinned") : null,
      );
      const labels = d.labels || {};
      const facts = [
        ["Class", d.device_class],
        ["Site", labels.site],
        ["Line", labels.line],
        [
          "Other labels",
          Object.entries(labels)
            .filter(([k]) => k !== "site" && k !== "line")
            .map(([k, v]) => `${k}=${v}`)
            .join(", "),
        ],
        ["Active model", m.model],
        ["Variant", m.variant],
        ["Tier", d.tier ? `${d.tier}${d.tier_at ? ` (reported ${ago(d.tier_at)})` : ""}` : null],
        ["Fallback", d.fallback_model],
        ["Desired", d.desired_model],
        ["Last good", d.last_good_model],
        ["Pinned", d.pinned ? d.pin_reason || "yes" : null],
        [
          "Deploy retry",
          d.deploy_retry
            ? `${d.deploy_retry.model} failed ${d.deploy_retry.failures}x (${d.deploy_retry.error || "?"}); ` +
              `next try ${clock(d.deploy_retry.next_try)}`
            : null,
        ],
        ["Revoked", d.revoked ? d.revoked_at || "yes" : null],
        ["Rejected messages", d.rejected_messages ? String(d.rejected_messages) : null],
        ["Dropped by the agent", d.outbox_dropped ? String(d.outbox_dropped) : null],
        ["Latency p95", num(d.latency_p95_ms) === null ? null : `${fixed(d.latency_p95_ms, 3)} ms`],
        ["Power", num(d.power_w) === null ? null : `${fixed(d.power_w, 2)} W (${d.power_method || "?"})`],
        ["Last seen", d.last_seen ? `${ago(d.last_seen)} (${clock(d.last_seen)})` : null],
        ["Agent", d.agent_version],
      ].filter(([, v]) => v !== null && v !== undefined && v !== "");
      fill(
        document.getElementById("device-facts"),
        facts.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-fact": slug(k.toLowerCase()) }, v)]),
      );

      const rows = data.telemetry.map((r) => ({ ...r, t: parseTime(r.start) })).filter((r) => r.t !== null);
      const bands = [];
      rows.forEach((r, i) => {
        if (!FALLBACK_TIERS.has(r.tier)) return;
        const end = i + 1 < rows.length ? rows[i + 1].t : r.t + (num(r.window_s) || 1) * 1000;
        const last = bands[bands.length - 1];
        if (last && last.tier === r.tier && last.to >= r.t) last.to = end;
        else bands.push({ from: r.t, to: end, tier: r.tier, cls: "band-fallback", label: `tier ${r.tier}` });
      });
      const series = (field, scale) =>
        rows.map((r) => ({
          t: r.t,
          y: num(r[field]) === null ? null : r[field] * (scale || 1),
          tier: r.tier,
        }));
      const range = this.minutes >= 60 ? `${this.minutes / 60} h` : `${this.minutes} min`;
      const charts = [
        [
          "latency-chart",
          GFCharts.timeSeries({
            id: "latency-chart",
            title: `Latency of ${d.id}, last ${range}`,
            summary: `${rows.length} telemetry windows; newest p95 ${fixed(d.latency_p95_ms, 3)} ms`,
            unit: "ms",
            bands,
            series: [
              { name: "p95", cls: "s-p95", points: series("latency_p95_ms") },
              { name: "p50", cls: "s-p50", points: series("latency_p50_ms") },
            ],
          }),
        ],
        [
          "power-chart",
          GFCharts.timeSeries({
            id: "power-chart",
            title: `Power of ${d.id}, last ${range}`,
            summary: `${rows.length} telemetry windows; newest ${fixed(d.power_w, 2)} W`,
            unit: "W",
            bands,
            series: [{ name: "power", cls: "s-power", points: series("power_w") }],
          }),
        ],
        [
          "energy-chart",
          GFCharts.timeSeries({
            id: "energy-chart",
            title: `Energy per inference of ${d.id}, last ${range}`,
            summary: `${rows.length} telemetry windows`,
            unit: "mJ",
            bands,
            series: [
              {
                name: "energy per inference",
                cls: "s-energy",
                points: series("energy_per_inference_j", 1000),
              },
            ],
          }),
        ],
      ];
      for (const [id, svg] of charts) document.getElementById(`${id}-box`).replaceChildren(svg);

      syncRows(
        document.querySelector("#events-table tbody"),
        d.recent_events || [],
        (e) => `${e.ts}|${e.event}|${e.message}`,
        (e) => [h("td", { title: e.ts }, clock(e.ts)), h("td", {}, e.event), h("td", {}, e.message || "")],
        () => ({ "data-testid": "event-row" }),
        "No events yet.",
      );
      syncRows(
        document.querySelector("#tier-changes-table tbody"),
        d.recent_tier_changes || [],
        (e) => `${e.ts}|${e.message}`,
        (e) => {
          const x = e.detail || {};
          return [
            h("td", { title: e.ts }, clock(e.ts)),
            h("td", {}, tierBadge(x.from)),
            h("td", {}, tierBadge(x.to)),
            h("td", {}, String(x.cause || e.message || "")),
          ];
        },
        null,
        "No tier change: it has answered from its active model.",
      );
    },
  };

  /* Models: every version with its variants, and energy against fidelity per version. */

  /* A variant's profiled latency ({runtime: ms}) in the runtime of its format. */
  function latencyMs(v, which) {
    const x = v[`latency_${which}_ms`] || {};
    const own = x[v.format === "tflite" ? "litert" : "onnxruntime"];
    if (num(own) !== null) return own;
    const any = Object.values(x).filter((y) => num(y) !== null);
    return any.length ? Math.min(...any) : null;
  }

  function runtimesTitle(v, which) {
    const x = v[`latency_${which}_ms`] || {};
    return (
      Object.entries(x)
        .map(([rt, ms]) => `${rt} ${fixed(ms, 3)} ms`)
        .join(", ") || null
    );
  }

  /* A variant's fleet energy figure by how its per-class figures were obtained (the API's
   * energy_source): the short label beside the number, and what it means. */
  const ENERGY_SOURCES = {
    telemetry: ["fleet", "measured by the fleet on every device class"],
    mixed: ["part fleet", "measured on some device classes, estimated on the others"],
    "field-corrected profile": [
      "est.",
      "estimated from the profile, scaled by what the variants that ran on each class measured against their profiles",
    ],
    profile: ["profile", "estimated from the variant's profile: nothing has run on these classes yet"],
  };

  function energyByClassTitle(v) {
    return (
      list(v.energy_by_class)
        .map((c) => `${c.device_class}: ${sig(c.energy_j * 1000, 3)} mJ (${c.source}), ${fixed(c.vs_fp32, 2)} × fp32`)
        .join("\n") || null
    );
  }

  const METRICS = { roc_auc: "AUC", accuracy: "accuracy", r2: "R²" };

  views.models = {
    title: "Models",
    mount() {
      return [
        h(
          "div",
          { class: "head" },
          h("h2", {}, "Models"),
          h("p", { class: "summary", id: "models-summary", "data-testid": "models-summary" }),
        ),
        h("div", { id: "models-list" }),
      ];
    },
    async load() {
      return list(await api("/models"));
    },
    render(data) {
      const box = document.getElementById("models-list");
      const versions = data.slice().sort((a, b) => String(a.id).localeCompare(String(b.id)));
      fill(document.getElementById("models-summary"), plural(versions.length, "model version"));
      const keep = new Set();
      for (const v of versions) {
        const sid = `model-${slug(v.id)}`;
        keep.add(sid);
        let sec = document.getElementById(sid);
        if (!sec) {
          sec = h(
            "section",
            { id: sid, class: "card model", "data-testid": "model-card", "data-model-id": v.id },
            h("h3", {}, v.id),
            h("p", { class: "meta" }),
            h(
              "div",
              { class: "model-body" },
              h(
                "div",
                { class: "table-wrap" },
                table(
                  `${sid}-variants`,
                  `Variants of ${v.id}`,
                  [
                    { label: "Variant" },
                    { label: "Format" },
                    { label: "Precision" },
                    { label: "Size", num: true },
                    { label: "× fp32", num: true },
                    { label: "Latency p50 (ms)", num: true },
                    { label: "Latency p95 (ms)", num: true },
                    { label: "Fidelity", num: true },
                    {
                      label: "Energy / inference (mJ)",
                      num: true,
                      title: "the mean over the fleet's device classes, each priced as the plan prices it (hover a figure for its classes)",
                    },
                    {
                      label: "Energy × fp32",
                      num: true,
                      title: "energy per inference against the fp32 variant, same classes and basis: the energy report's saving is 1 minus this",
                    },
                    {
                      label: "Build (J)",
                      num: true,
                      title: "what the compress run spent making it: its builder plus the shared reference and profiling steps",
                    },
                    { label: "Eligible" },
                  ],
                  { "data-role": "variants" },
                ),
              ),
              h(
                "figure",
                { class: "chart-box scatter-box" },
                h("figcaption", {}, "Energy per inference against fidelity"),
                h("div", { class: "scatter-holder" }),
              ),
              h(
                "p",
                { class: "scatter-note" },
                "Each point is a variant: further left spends less energy per inference, higher keeps more of the model's fidelity on the calibration set. Hollow points are not eligible (see the table). Energy is the mean over the fleet's device classes: on a class where the variant ran, what it measured there; elsewhere its profile estimate, scaled by how much more the variants that did run on that class measured than their profiles promised.",
              ),
            ),
          );
          box.appendChild(sec);
        }
        const variants = v.variant_list || [];
        const metric = (variants.find((x) => x.metric) || {}).metric;
        fill(
          sec.querySelector(".meta"),
          [
            v.task ? `task ${v.task}` : null,
            num(v.accuracy_floor) !== null ? `accuracy floor ${v.accuracy_floor}` : null,
            `${plural(variants.length, "variant")}, ${variants.filter((x) => x.eligible).length} eligible`,
            v.compressed ? `compressed ${clock(v.compressed)}` : null,
          ]
            .filter(Boolean)
            .join(" · "),
        );
        syncRows(
          sec.querySelector("tbody"),
          variants,
          (x) => x.id || x.variant,
          (x) => {
            const e = num(x.energy_j);
            return [
              h("th", { scope: "row", "data-col": "variant" }, x.variant || "(source)"),
              h("td", { "data-col": "format" }, x.format || "–"),
              h("td", { "data-col": "precision" }, x.precision || "–"),
              h(
                "td",
                { "data-col": "size", class: "num", title: num(x.size) === null ? null : `${x.size} bytes` },
                bytesText(x.size),
              ),
              h("td", { "data-col": "size_ratio", class: "num" }, fixed(x.size_ratio, 2)),
              h(
                "td",
                { "data-col": "latency_p50_ms", class: "num", title: runtimesTitle(x, "p50") },
                fixed(latencyMs(x, "p50"), 3),
              ),
              h(
                "td",
                { "data-col": "latency_p95_ms", class: "num", title: runtimesTitle(x, "p95") },
                fixed(latencyMs(x, "p95"), 3),
              ),
              h(
                "td",
                { "data-col": "fidelity", class: "num" },
                num(x.metric_value) === null
                  ? "–"
                  : `${METRICS[x.metric] || x.metric || ""} ${fixed(x.metric_value, 3)}`,
              ),
              h(
                "td",
                { "data-col": "energy", class: "num", title: energyByClassTitle(x) },
                e === null ? "–" : sig(e * 1000, 3),
                e !== null && x.energy_source
                  ? h(
                      "span",
                      { class: "est", title: ENERGY_SOURCES[x.energy_source]?.[1] || x.energy_source },
                      ` ${ENERGY_SOURCES[x.energy_source]?.[0] || x.energy_source}`,
                    )
                  : null,
              ),
              h("td", { "data-col": "energy_vs_fp32", class: "num" }, fixed(x.vs_fp32, 2)),
              h(
                "td",
                { "data-col": "build", class: "num" },
                num(x.build_j) === null ? "–" : sig(x.build_j, 3),
                num(x.build_j) !== null
                  ? h(
                      "span",
                      {
                        class: "est",
                        title:
                          x.build_energy === "measured"
                            ? "measured from the CPU packages' RAPL counters"
                            : "estimated from CPU time at an assumed 4.4 W per busy core",
                      },
                      x.build_energy === "measured" ? " RAPL" : " est.",
                    )
                  : null,
              ),
              h(
                "td",
                { "data-col": "eligible", title: x.reason || null },
                x.eligible ? badge("yes", "ok") : badge("no", "bad"),
                x.reason ? h("span", { class: "why" }, ` ${x.reason}`) : null,
              ),
            ];
          },
          (x) => ({ "data-testid": "variant-row", "data-variant": x.variant || "(source)" }),
        );
        const points = variants.map((x) => ({
          x: num(x.energy_j) === null ? null : x.energy_j * 1000,
          y: num(x.metric_value),
          label: x.variant || "(source)",
          ok: !!x.eligible,
        }));
        const plotted = points.filter((p) => p.x !== null && p.y !== null).length;
        const svg = GFCharts.scatter({
          id: `${sid}-scatter`,
          testid: "energy-fidelity-chart",
          title: `${v.id}: energy per inference against fidelity`,
          summary: `${plotted} of ${variants.length} variants plotted`,
          xLabel: "mJ per inference",
          yLabel: METRICS[metric] || metric || "fidelity",
          points,
          yMax: metric === "roc_auc" || metric === "accuracy" ? 1 : undefined,
          emptyText: "no variant has both an energy estimate and a fidelity (compress with --calibration)",
        });
        const holder = sec.querySelector(".scatter-holder");
        if (!plotted) {
          fill(
            holder,
            h(
              "p",
              { class: "empty-note" },
              "Nothing to plot: no variant has both an energy figure and a measured fidelity (compress it with --calibration).",
            ),
          );
        } else if (!holder.firstChild || holder.firstChild.outerHTML !== svg.outerHTML) {
          holder.replaceChildren(svg);
        }
        sec.querySelector(".scatter-note").hidden = !plotted;
      }
      for (const sec of [...box.children]) if (!keep.has(sec.id)) sec.remove();
      if (!versions.length)
        fill(
          box,
          h("p", { class: "empty-note" }, "No models yet: greenfleet models add FILE --name N --version V."),
        );
    },
  };

  /* Rollouts: per rollout a bar per wave (devices on the new model), gates against limits. */
  const WAVE_STATES = ["updated", "updating", "pending", "failed", "missed", "rolling_back", "rolled_back"];
  const FINISHED = new Set(["completed", "aborted"]);

  function waveName(w) {
    return w === 0 ? "canary" : w < 0 ? "–" : `wave ${w}`;
  }

  function gateText(name, value) {
    if (num(value) === null) return "–";
    if (name.includes("regression")) return `${value >= 0 ? "+" : ""}${(value * 100).toFixed(0)} %`;
    if (name.includes("increase")) return `${value >= 0 ? "+" : ""}${(value * 100).toFixed(1)} pts`;
    if (name.includes("rate")) return pct(value);
    return sig(value, 4);
  }

  function progressBar(value, max, label, testid, extra) {
    const share = max > 0 ? Math.min(1, value / max) : 0;
    return h(
      "div",
      {
        class: "bar",
        role: "progressbar",
        "aria-valuemin": 0,
        "aria-valuemax": max,
        "aria-valuenow": value,
        "aria-label": label,
        "data-testid": testid,
        ...(extra || {}),
      },
      h("span", { class: "fill", style: { width: `${(share * 100).toFixed(1)}%` } }),
    );
  }

  function rolloutCard(r, full, eventsOpen) {
    const members = r.members || [];
    const waves = new Map();
    for (const m of members) {
      if (m.status === "skipped" || m.status === "cancelled") continue;
      if (!waves.has(m.wave)) waves.set(m.wave, []);
      waves.get(m.wave).push(m);
    }
    const total = num(r.total) ?? [...waves.values()].reduce((a, w) => a + w.length, 0);
    const updated = num(r.updated) ?? members.filter((m) => m.status === "updated").length;
    const after = Math.max((r.waves || 0) - 1, 0);
    const position =
      r.wave === 0
        ? `canary, ${after} wave${after === 1 ? "" : "s"} to follow`
        : r.wave > 0
          ? `wave ${r.wave} of ${after}`
          : "";
    const gates = (r.gates && r.gates.results) || [];
    const gatesAt = r.gates && r.gates.at;
    let soak = null;
    if (r.status === "running" && r.soak_started && num(r.soak_s)) {
      const el = Math.min(r.soak_s, Math.max(0, (Date.now() - parseTime(r.soak_started)) / 1000));
      soak = h(
        "p",
        { class: "soak", "data-testid": "rollout-soak" },
        `${waveName(r.wave)} soaking: ${el.toFixed(0)} s of ${r.soak_s} s`,
      );
    }
    const events = (r.events || []).slice(0, full ? 50 : 5);
    return [
      h(
        "header",
        {},
        h(
          "h3",
          {},
          h("a", { href: `#/rollouts/${enc(r.id)}` }, `Rollout ${r.id}`),
          " ",
          h("span", { class: "model-ref" }, r.model),
        ),
        badge(r.status, `rollout-${r.status}`, "rollout-status"),
      ),
      h(
        "p",
        { class: "meta" },
        [
          position,
          `${updated}/${total} devices updated`,
          ...["failed", "missed", "rolling_back", "rolled_back", "skipped"]
            .filter((k) => r[k])
            .map((k) => `${r[k]} ${k.replace("_", " ")}`),
        ]
          .filter(Boolean)
          .join(" · "),
      ),
      progressBar(
        updated,
        total,
        `rollout ${r.id}: ${updated} of ${total} devices updated`,
        "rollout-progress",
        { "data-updated": updated, "data-total": total },
      ),
      r.reason
        ? h(
            "p",
            {
              class: `reason${["aborting", "aborted", "paused"].includes(r.status) ? " bad" : ""}`,
              "data-testid": "rollout-reason",
            },
            r.reason,
          )
        : null,
      h(
        "ol",
        { class: "waves", "aria-label": `waves of rollout ${r.id}` },
        [...waves.keys()]
          .sort((a, b) => a - b)
          .map((w) => {
            const ms = waves.get(w);
            const counts = {};
            for (const m of ms) counts[m.status] = (counts[m.status] || 0) + 1;
            const done = counts.updated || 0;
            const current = w === r.wave && !FINISHED.has(r.status);
            return h(
              "li",
              {
                class: `wave${current ? " current" : ""}`,
                "data-testid": "wave",
                "data-wave": w,
                "data-updated": done,
                "data-total": ms.length,
              },
              h("span", { class: "wave-name" }, current ? "▶ " : "", waveName(w)),
              h(
                "div",
                {
                  class: "bar stacked",
                  role: "progressbar",
                  "aria-valuemin": 0,
                  "aria-valuemax": ms.length,
                  "aria-valuenow": done,
                  "aria-label": `${waveName(w)}: ${done} of ${ms.length} updated`,
                  "data-testid": "wave-bar",
                },
                WAVE_STATES.filter((s) => counts[s]).map((s) =>
                  h("span", {
                    class: `seg seg-${s}`,
                    style: { width: `${((counts[s] / ms.length) * 100).toFixed(1)}%` },
                    title: `${counts[s]} ${s}`,
                  }),
                ),
              ),
              h("span", { class: "wave-count" }, `${done}/${ms.length}`),
              h(
                "span",
                { class: "wave-states" },
                Object.entries(counts)
                  .map(([s, n]) => `${n} ${s.replace("_", " ")}`)
                  .join(", "),
              ),
              full ? h("span", { class: "wave-devices" }, ms.map((m) => m.device).join(", ")) : null,
            );
          }),
      ),
      soak,
      gates.length
        ? h(
            "table",
            { class: "data gates", "data-testid": "gates-table" },
            h(
              "caption",
              {},
              `Gates${r.gates && r.gates.wave !== undefined && r.gates.wave !== null ? ` (${waveName(r.gates.wave)}${gatesAt ? `, ${clock(gatesAt)}` : ""})` : ""}`,
            ),
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["Gate", "Value", "Limit", "Verdict", "Detail"].map((c) => h("th", { scope: "col" }, c)),
              ),
            ),
            h(
              "tbody",
              {},
              gates.map((g) =>
                h(
                  "tr",
                  { "data-testid": "gate-row", "data-gate": g.name, class: g.breached ? "breached" : "" },
                  h("th", { scope: "row" }, g.name),
                  h("td", { class: "num", "data-col": "value" }, gateText(g.name, g.value)),
                  h("td", { class: "num", "data-col": "limit" }, gateText(g.name, g.limit)),
                  h(
                    "td",
                    { "data-col": "verdict" },
                    g.breached
                      ? badge("breached", "bad")
                      : g.judged
                        ? badge("ok", "ok")
                        : badge("waiting", "wait"),
                  ),
                  h("td", { class: "detail" }, g.detail || ""),
                ),
              ),
            ),
          )
        : h("p", { class: "empty-note" }, "No gate judged yet."),
      events.length
        ? h(
            "details",
            { class: "events", open: full || eventsOpen || null },
            h("summary", {}, `Recent events (${events.length})`),
            h(
              "ul",
              {},
              events.map((e) =>
                h(
                  "li",
                  {},
                  h("time", { datetime: e.ts }, clock(e.ts)),
                  " ",
                  h("strong", {}, e.event),
                  e.device ? ` ${e.device}` : "",
                  `: ${e.message || ""}`,
                ),
              ),
            ),
          )
        : null,
    ];
  }

  views.rollouts = {
    title: "Rollouts",
    mount(id) {
      this.only = id || null;
      return [
        this.only
          ? h("p", { class: "crumbs" }, h("a", { href: "#/rollouts" }, "Rollouts"), " / ", this.only)
          : null,
        h(
          "div",
          { class: "head" },
          h("h2", {}, this.only ? `Rollout ${this.only}` : "Rollouts"),
          h("p", { class: "summary", id: "rollouts-summary", "data-testid": "rollouts-summary" }),
        ),
        h("div", { id: "rollouts-list" }),
      ];
    },
    async load() {
      if (this.only) return { total: 1, items: [await api(`/rollouts/${enc(this.only)}`)] };
      const all = list(await api("/rollouts"));
      all.sort(
        (a, b) =>
          String(b.created || "").localeCompare(String(a.created || "")) ||
          String(b.id).localeCompare(String(a.id), undefined, { numeric: true }),
      );
      const items = await Promise.all(
        all.slice(0, ROLLOUT_DETAILS).map((r) => api(`/rollouts/${enc(r.id)}`).then((d) => ({ ...r, ...d }))),
      );
      return { total: all.length, live: all.filter((r) => !FINISHED.has(r.status)).length, items };
    },
    render(data) {
      const box = document.getElementById("rollouts-list");
      fill(
        document.getElementById("rollouts-summary"),
        this.only
          ? ""
          : `${plural(data.total, "rollout")}, ${data.live} in progress${data.total > ROLLOUT_DETAILS ? ` (newest ${ROLLOUT_DETAILS} shown)` : ""}`,
      );
      const keep = new Set();
      let before = box.firstElementChild;
      for (const r of data.items) {
        const cid = `rollout-${slug(r.id)}`;
        keep.add(cid);
        let card = document.getElementById(cid);
        if (!card)
          card = h("section", {
            id: cid,
            class: "card rollout",
            "data-testid": "rollout-card",
            "data-rollout-id": r.id,
          });
        card.dataset.status = r.status;
        const open = card.querySelector("details.events"); // keep what the reader opened
        fill(card, rolloutCard(r, !!this.only, open ? open.open : false));
        if (card !== before) box.insertBefore(card, before);
        before = card.nextElementSibling;
      }
      for (const c of [...box.children]) if (!keep.has(c.id)) c.remove();
      if (!data.items.length)
        fill(
          box,
          h("p", { class: "empty-note" }, "No rollouts yet: greenfleet rollout create --file SPEC.yaml."),
        );
    },
  };

  /* Energy: kWh and CO2e per site, measured against estimated, saving against fp32.
   *
   * The report's (site, model, variant) rows added up per site. The saving is over the rows
   * whose fp32 baseline is known, as the report's total does it. */
  function siteRows(body) {
    const by = new Map();
    for (const r of list(body.rows)) {
      const s = by.get(r.site) || {
        site: r.site,
        inferences: 0,
        device_kwh: 0,
        measured_kwh: 0,
        estimated_kwh: 0,
        co2e_kg: 0,
        _spent: 0,
        _base: 0,
      };
      s.inferences += r.inferences || 0;
      s.device_kwh += r.device_kwh || 0;
      s.measured_kwh += r.measured_kwh || 0;
      s.estimated_kwh += r.estimated_kwh || 0;
      s.co2e_kg += r.co2e_kg || 0;
      s.grid_g_co2e_per_kwh = r.grid_g_co2e_per_kwh;
      if (num(r.fp32_j_per_inference) !== null && num(r.j_per_inference) !== null) {
        s._spent += r.j_per_inference * r.inferences;
        s._base += r.fp32_j_per_inference * r.inferences;
      }
      by.set(r.site, s);
    }
    for (const s of by.values()) s.saving_vs_fp32 = s._base > 0 ? 1 - s._spent / s._base : null;
    return [...by.values()];
  }

  views.energy = {
    title: "Energy",
    hours: 24,
    mount() {
      const hours = h(
        "select",
        {
          id: "energy-hours",
          "data-testid": "energy-hours",
          onchange: (e) => {
            this.hours = Number(e.target.value);
            refresh();
          },
        },
        [
          [1, "last hour"],
          [24, "last 24 hours"],
          [168, "last 7 days"],
          [720, "last 30 days"],
          [0, "all time"],
        ].map(([v, t]) => h("option", { value: v, selected: v === this.hours }, t)),
      );
      return [
        h(
          "div",
          { class: "head" },
          h("h2", {}, "Energy"),
          h("p", { class: "summary", id: "energy-summary", "data-testid": "energy-summary" }),
          h("label", { for: "energy-hours", class: "filter" }, "Period ", hours),
        ),
        h("div", { class: "tiles", id: "energy-tiles" }),
        table("energy-table", "Energy and CO2e per site", [
          { label: "Site" },
          { label: "Devices", num: true, title: "devices with this site label" },
          { label: "Inferences", num: true },
          { label: "Energy (kWh)", num: true },
          { label: "Measured", num: true },
          { label: "Estimated", num: true },
          { label: "CO2e", num: true },
          { label: "Grid (g/kWh)", num: true },
          {
            label: "Saving vs fp32",
            num: true,
            title: "inference energy saved against the fp32 reference on the same device classes",
          },
        ]),
        h(
          "p",
          { class: "note" },
          "Device energy is mean power × time from telemetry; “estimated” rows come from the CPU-time estimate, not a meter. The saving compares inference energy with what the fp32 variant would have spent for the same inferences.",
        ),
        table("energy-variants", "Saving and payback per variant", [
          { label: "Site" },
          { label: "Model" },
          { label: "Variant" },
          { label: "Inferences", num: true },
          { label: "Saving vs fp32", num: true },
          {
            label: "Saved / day",
            num: true,
            title: "inference energy saved against fp32 per day, at the inference rate of the period",
          },
          {
            label: "Build (J)",
            num: true,
            title: "what the compress run spent making the variant (see the Models page)",
          },
          {
            label: "Payback",
            num: true,
            title: "when the saving has paid for the build, at the inference rate of the period; paid: it already has",
          },
        ]),
        h("p", { class: "note", id: "energy-period" }),
      ];
    },
    async load() {
      const [report, devices] = await Promise.all([
        api(`/energy${this.hours ? `?hours=${this.hours}` : ""}`),
        api("/devices"),
      ]);
      return { report, devices: list(devices) };
    },
    render(data) {
      const body = data.report;
      const sites = siteRows(body);
      // devices per site from the registry: a device that changed variant is in several rows
      const perSite = {};
      for (const d of data.devices) {
        const site = (d.labels || {}).site || "-";
        perSite[site] = (perSite[site] || 0) + 1;
      }
      const t = body.total || {};
      const kwh = num(t.device_kwh) ?? sites.reduce((a, s) => a + (s.device_kwh || 0), 0);
      const co2 = num(t.co2e_kg) ?? sites.reduce((a, s) => a + (s.co2e_kg || 0), 0);
      const saving = num(t.saving_vs_fp32);
      const daily = num(t.daily_saving_j);
      fill(document.getElementById("energy-summary"), plural(sites.length, "site"));
      fill(
        document.getElementById("energy-tiles"),
        h(
          "div",
          { class: "tile", "data-testid": "energy-total-kwh", "data-kwh": kwh },
          h("span", { class: "tile-label" }, "Energy"),
          h("span", { class: "tile-value" }, energyText(kwh)),
          h("span", { class: "tile-sub" }, `${sig(kwh, 3)} kWh`),
        ),
        h(
          "div",
          { class: "tile", "data-testid": "energy-total-co2e" },
          h("span", { class: "tile-label" }, "CO2e"),
          h("span", { class: "tile-value" }, massText(co2)),
        ),
        h(
          "div",
          { class: "tile", "data-testid": "energy-total-saving" },
          h("span", { class: "tile-label" }, "Saving vs fp32"),
          h("span", { class: "tile-value" }, pct(saving)),
        ),
        h(
          "div",
          { class: "tile", "data-testid": "energy-daily-saving" },
          h("span", { class: "tile-label" }, "Saved a day"),
          h("span", { class: "tile-value" }, energyText(daily === null ? null : daily / 3.6e6)),
          h("span", { class: "tile-sub" }, "against fp32, at the period's rate"),
        ),
      );
      fill(
        document.getElementById("energy-period"),
        num(t.period_s) === null
          ? "No telemetry in this period."
          : `Rates (saved a day, payback) are over the ${durationText(t.period_s)} from the first telemetry window of the period to the last.`,
      );
      syncRows(
        document.querySelector("#energy-variants tbody"),
        list(body.rows),
        (r) => `${r.site}|${r.model}|${r.variant}`,
        (r) => [
          h("td", { "data-col": "site" }, r.site || "–"),
          h("td", { "data-col": "model" }, r.model),
          h("th", { scope: "row", "data-col": "variant" }, r.variant),
          h(
            "td",
            { class: "num", "data-col": "inferences" },
            num(r.inferences) === null ? "–" : r.inferences.toLocaleString(),
          ),
          h("td", { class: "num", "data-col": "saving" }, pct(r.saving_vs_fp32)),
          h(
            "td",
            { class: "num", "data-col": "daily_saving" },
            num(r.daily_saving_j) === null ? "–" : energyText(r.daily_saving_j / 3.6e6),
          ),
          h(
            "td",
            { class: "num", "data-col": "build" },
            num(r.build_j) === null ? "–" : sig(r.build_j, 3),
            num(r.build_j) !== null && r.build_energy !== "measured" ? h("span", { class: "est" }, " est.") : null,
          ),
          h(
            "td",
            {
              class: "num",
              "data-col": "payback",
              title: num(r.payback_inferences) === null ? null : `${Math.round(r.payback_inferences).toLocaleString("en")} inferences`,
            },
            paybackText(r),
          ),
        ],
        (r) => ({ "data-testid": "energy-variant-row", "data-variant": r.variant }),
      );
      syncRows(
        document.querySelector("#energy-table tbody"),
        sites,
        (s) => s.site,
        (s) => [
          h("th", { scope: "row", "data-col": "site" }, s.site || "–"),
          h("td", { class: "num", "data-col": "devices" }, String(perSite[s.site] ?? "–")),
          h(
            "td",
            { class: "num", "data-col": "inferences" },
            num(s.inferences) === null ? "–" : s.inferences.toLocaleString(),
          ),
          h(
            "td",
            { class: "num", "data-col": "kwh", "data-kwh": s.device_kwh, title: `${s.device_kwh} kWh` },
            energyText(s.device_kwh),
          ),
          h("td", { class: "num", "data-col": "measured_kwh" }, energyText(s.measured_kwh)),
          h("td", { class: "num", "data-col": "estimated_kwh" }, energyText(s.estimated_kwh)),
          h("td", { class: "num", "data-col": "co2e", "data-co2e-kg": s.co2e_kg }, massText(s.co2e_kg)),
          h("td", { class: "num", "data-col": "grid" }, sig(s.grid_g_co2e_per_kwh, 3)),
          h("td", { class: "num", "data-col": "saving" }, pct(s.saving_vs_fp32)),
        ],
        (s) => ({ "data-testid": "energy-row", "data-site": s.site }),
      );
    },
  };

  // -------------------------------------------------------------------------------- routing

  let current = null; // {name, arg, view}
  let timer = null;
  let seq = 0; // only the newest refresh renders and schedules the next one
  let updates = 0;

  function route() {
    const parts = (location.hash.replace(/^#\/?/, "") || "fleet").split("/").map(decodeURIComponent);
    if (parts[0] === "devices" && parts[1]) return ["device", parts.slice(1).join("/")];
    if (parts[0] === "rollouts") return ["rollouts", parts[1] || null];
    return [views[parts[0]] && parts[0] !== "device" ? parts[0] : "fleet", null];
  }

  function navigate() {
    const [name, arg] = route();
    current = { name, arg, view: views[name] };
    document.title = `${arg ? `${arg} · ` : ""}${current.view.title} · greenfleet`;
    for (const a of document.querySelectorAll("nav a")) {
      const on = a.dataset.route === (name === "device" ? "fleet" : name);
      if (on) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    view.dataset.view = name;
    view.dataset.ready = "false";
    view.replaceChildren(...current.view.mount(arg).filter(Boolean));
    refresh();
  }

  async function refresh() {
    clearTimeout(timer);
    const my = ++seq;
    const cur = current;
    if (document.visibilityState === "hidden" && view.dataset.ready === "true") {
      timer = setTimeout(refresh, POLL_MS); // a tab in the background asks nothing
      return;
    }
    try {
      const data = await cur.view.load();
      if (my !== seq) return; // the page or its range changed while this was in flight
      cur.view.render(data);
      updates += 1;
      view.dataset.ready = "true";
      document.body.dataset.updates = String(updates);
      showError(null);
      document.getElementById("last-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      document.getElementById("live-dot").className = "dot ok";
    } catch (err) {
      if (my !== seq) return;
      console.error(err);
      document.getElementById("live-dot").className = "dot bad";
      if (err instanceof ApiError && err.status === 404 && cur.arg)
        showError(`Not found: ${err.message.replace(/^404 /, "")}`);
      else if (err instanceof ApiError && (err.status === 401 || err.status === 403))
        showError(
          `The API refused the request (${err.message}): open the dashboard with ?token=YOUR_TOKEN in its address.`,
        );
      else showError(`Cannot reach the API (${err.message}); retrying every ${POLL_MS / 1000} s.`);
    } finally {
      if (my === seq) timer = setTimeout(refresh, POLL_MS);
    }
  }

  function showError(text) {
    const box = document.getElementById("api-error");
    box.hidden = !text;
    if (text && box.textContent !== text) box.textContent = text;
  }

  window.addEventListener("hashchange", navigate);
  // the skip link moves focus; following its #view would leave the page the router shows
  document.querySelector(".skip").addEventListener("click", (e) => {
    e.preventDefault();
    view.focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refresh();
  });
  navigate();
})();
