/* greenfleet dashboard: two small hand-written SVG charts (a time series and a scatter plot).
 *
 * Why not a chart library: the dashboard needs exactly these two charts over at most a few
 * hundred points, and SVG elements are what tests and screen readers can inspect (every
 * point is a <circle> with a <title>; the chart has role="img" and a text summary). No
 * vendored code to keep up to date, no licence to carry, no build step.
 *
 * Exposes window.GFCharts = { timeSeries(opts), scatter(opts) }; both return an <svg>.
 */
(function () {
  "use strict";

  const NS = "http://www.w3.org/2000/svg";
  const W = 640;
  const H = 230;
  const M = { top: 14, right: 16, bottom: 34, left: 58 };
  const MAX_MARKERS = 240; // beyond this a line carries the data and markers are left out

  function el(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function titled(node, text) {
    node.appendChild(el("title", {}, text));
    return node;
  }

  /* Round ticks between lo and hi, about `count` of them. */
  function niceTicks(lo, hi, count) {
    if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
    if (hi === lo) {
      const pad = Math.abs(hi) > 0 ? Math.abs(hi) * 0.1 : 1;
      lo -= pad;
      hi += pad;
    }
    const raw = (hi - lo) / Math.max(count, 1);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const first = Math.floor(lo / step) * step;
    const ticks = [];
    for (let t = first; t <= hi + step * 0.5 && ticks.length < 50; t += step) {
      ticks.push(Number(t.toPrecision(12)));
    }
    if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
    return ticks;
  }

  const TIME_STEPS = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
  ].map((s) => s * 1000);

  function timeTicks(lo, hi, count) {
    const span = Math.max(hi - lo, 1000);
    const step = TIME_STEPS.find((s) => span / s <= count) || TIME_STEPS[TIME_STEPS.length - 1];
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) ticks.push(t);
    return { ticks, step };
  }

  function pad2(n) {
    return String(n).padStart(2, "0");
  }

  function timeLabel(ms, step) {
    const d = new Date(ms);
    const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
    return step < 60000 ? `${hm}:${pad2(d.getSeconds())}` : hm;
  }

  function fmtNumber(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1000 || a < 0.001) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  function frame(svg, x0, x1, y0, y1) {
    svg.appendChild(el("rect", { class: "plot-bg", x: x0, y: y0, width: x1 - x0, height: y1 - y0 }));
  }

  function yAxis(svg, ticks, sy, label) {
    const g = el("g", { class: "axis axis-y" });
    for (const t of ticks) {
      const y = sy(t);
      g.appendChild(el("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y, y2: y }));
      g.appendChild(el("text", { x: M.left - 6, y: y + 4, "text-anchor": "end" }, fmtNumber(t)));
    }
    if (label) {
      g.appendChild(
        el(
          "text",
          {
            class: "axis-label",
            transform: `translate(14 ${(M.top + H - M.bottom) / 2}) rotate(-90)`,
            "text-anchor": "middle",
          },
          label,
        ),
      );
    }
    svg.appendChild(g);
  }

  function base(opts, kind) {
    const svg = el("svg", {
      viewBox: `0 0 ${W} ${H}`,
      class: `chart chart-${kind}`,
      role: "img",
      "aria-labelledby": `${opts.id}-title ${opts.id}-desc`,
      id: opts.id,
      "data-testid": opts.testid || opts.id,
    });
    svg.appendChild(el("title", { id: `${opts.id}-title` }, opts.title || ""));
    svg.appendChild(el("desc", { id: `${opts.id}-desc` }, opts.summary || ""));
    return svg;
  }

  function empty(svg, message) {
    svg.setAttribute("data-points", "0");
    svg.appendChild(el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, message));
    return svg;
  }

  /* opts: {id, title, summary, unit, series: [{name, cls, points: [{t (ms), y, tier?}]}],
   *        bands: [{from, to, label}] (shaded time ranges), yMin (default 0)} */
  function timeSeries(opts) {
    const svg = base(opts, "time");
    const all = [];
    for (const s of opts.series) for (const p of s.points) if (p.y !== null && isFinite(p.y)) all.push(p);
    if (!all.length) return empty(svg, opts.emptyText || "no data in this range");
    let tLo = Math.min(...all.map((p) => p.t));
    let tHi = Math.max(...all.map((p) => p.t));
    if (tHi - tLo < 10000) {
      tLo -= 5000;
      tHi += 5000;
    }
    const yMin = opts.yMin === undefined ? 0 : opts.yMin;
    const yTicks = niceTicks(Math.min(yMin, ...all.map((p) => p.y)), Math.max(...all.map((p) => p.y)), 4);
    const yLo = yTicks[0];
    const yHi = yTicks[yTicks.length - 1];
    const sx = (t) => M.left + ((t - tLo) / (tHi - tLo)) * (W - M.left - M.right);
    const sy = (v) => H - M.bottom - ((v - yLo) / (yHi - yLo || 1)) * (H - M.top - M.bottom);
    frame(svg, M.left, W - M.right, M.top, H - M.bottom);

    for (const b of opts.bands || []) {
      const x0 = sx(Math.max(b.from, tLo));
      const x1 = sx(Math.min(b.to, tHi));
      if (x1 - x0 < 0.5) continue;
      svg.appendChild(
        titled(
          el("rect", {
            class: `band ${b.cls || ""}`,
            x: x0,
            y: M.top,
            width: x1 - x0,
            height: H - M.top - M.bottom,
          }),
          b.label,
        ),
      );
    }
    yAxis(svg, yTicks, sy, opts.unit);
    const { ticks, step } = timeTicks(tLo, tHi, 6);
    const gx = el("g", { class: "axis axis-x" });
    for (const t of ticks) {
      gx.appendChild(
        el("line", { class: "tick", x1: sx(t), x2: sx(t), y1: H - M.bottom, y2: H - M.bottom + 4 }),
      );
      gx.appendChild(
        el("text", { x: sx(t), y: H - M.bottom + 17, "text-anchor": "middle" }, timeLabel(t, step)),
      );
    }
    svg.appendChild(gx);

    let drawn = 0;
    opts.series.forEach((s, i) => {
      const pts = s.points.filter((p) => p.y !== null && isFinite(p.y));
      if (!pts.length) return;
      // break the line where the device sent nothing for a while (offline, restarted)
      const gaps = pts
        .slice(1)
        .map((p, k) => p.t - pts[k].t)
        .sort((a, b) => a - b);
      const typical = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 0;
      let d = "";
      pts.forEach((p, k) => {
        const jump = k === 0 || (typical > 0 && p.t - pts[k - 1].t > typical * 4);
        d += `${jump ? "M" : "L"}${sx(p.t).toFixed(1)},${sy(p.y).toFixed(1)}`;
      });
      const cls = s.cls || `series-${i}`;
      svg.appendChild(el("path", { class: `line ${cls}`, d, "data-series": s.name }));
      if (pts.length <= MAX_MARKERS) {
        const g = el("g", { class: `points ${cls}` });
        for (const p of pts) {
          const stamp = new Date(p.t).toLocaleTimeString();
          g.appendChild(
            titled(
              el("circle", { class: "point", cx: sx(p.t).toFixed(1), cy: sy(p.y).toFixed(1), r: 2.6 }),
              `${s.name} ${fmtNumber(p.y)} ${opts.unit || ""} at ${stamp}${p.tier ? ` (tier ${p.tier})` : ""}`,
            ),
          );
        }
        svg.appendChild(g);
      }
      drawn += pts.length;
    });
    svg.setAttribute("data-points", String(drawn));
    return svg;
  }

  /* opts: {id, title, summary, xLabel, yLabel, yMax, points: [{x, y, label, ok}]} */
  function scatter(opts) {
    const svg = base(opts, "scatter");
    const pts = opts.points.filter((p) => isFinite(p.x) && isFinite(p.y) && p.x !== null && p.y !== null);
    if (!pts.length) return empty(svg, opts.emptyText || "nothing to plot");
    const xTicks = niceTicks(0, Math.max(...pts.map((p) => p.x)), 5);
    const yLoRaw = Math.min(...pts.map((p) => p.y));
    const yHiRaw = Math.max(...pts.map((p) => p.y));
    let yTicks = niceTicks(yLoRaw - (yHiRaw - yLoRaw) * 0.1, yHiRaw, 4);
    if (opts.yMax !== undefined && yHiRaw <= opts.yMax) {
      // a score that cannot pass yMax (AUC, accuracy: 1) gets no axis beyond it
      yTicks = yTicks.filter((t) => t < opts.yMax);
      yTicks.push(opts.yMax);
    }
    const xLo = xTicks[0];
    const xHi = xTicks[xTicks.length - 1];
    const yLo = yTicks[0];
    const yHi = yTicks[yTicks.length - 1];
    const pad = 16; // points on an axis limit (AUC 1, 0 J) stay clear of the frame
    const sx = (v) => M.left + pad + ((v - xLo) / (xHi - xLo || 1)) * (W - M.left - M.right - 2 * pad);
    const sy = (v) => H - M.bottom - pad - ((v - yLo) / (yHi - yLo || 1)) * (H - M.top - M.bottom - 2 * pad);
    frame(svg, M.left, W - M.right, M.top, H - M.bottom);
    yAxis(svg, yTicks, sy, opts.yLabel);
    const gx = el("g", { class: "axis axis-x" });
    for (const t of xTicks) {
      gx.appendChild(el("line", { class: "grid", x1: sx(t), x2: sx(t), y1: M.top, y2: H - M.bottom }));
      gx.appendChild(el("text", { x: sx(t), y: H - M.bottom + 16, "text-anchor": "middle" }, fmtNumber(t)));
    }
    gx.appendChild(
      el(
        "text",
        { class: "axis-label", x: (M.left + W - M.right) / 2, y: H - 3, "text-anchor": "middle" },
        opts.xLabel,
      ),
    );
    svg.appendChild(gx);
    const g = el("g", { class: "points" });
    const labels = el("g", { class: "labels" });
    const placed = []; // label boxes so far: [x0, y0, x1, y1]
    const sorted = pts.slice().sort((a, b) => a.x - b.x || b.y - a.y);
    for (const p of sorted) {
      const cx = sx(p.x);
      const cy = sy(p.y);
      g.appendChild(
        titled(
          el("circle", {
            class: `point ${p.ok ? "ok" : "not-ok"}`,
            cx: cx.toFixed(1),
            cy: cy.toFixed(1),
            r: 5,
            "data-label": p.label,
          }),
          `${p.label}: ${fmtNumber(p.x)} ${opts.xLabel}, ${fmtNumber(p.y)} ${opts.yLabel}${p.ok ? "" : " (not eligible)"}`,
        ),
      );
      // the first spot, above or below the point, where the label overlaps no other label
      const width = p.label.length * 6.3;
      const right = cx + 8 + width < W - M.right;
      const x0 = right ? cx + 8 : cx - 8 - width;
      let y = cy - 7;
      for (const dy of [-7, 15, -20, 28, -33, 41, -46, 54]) {
        y = cy + dy;
        const box = [x0, y - 10, x0 + width, y + 2];
        if (!placed.some((o) => box[0] < o[2] && o[0] < box[2] && box[1] < o[3] && o[1] < box[3])) break;
      }
      placed.push([x0, y - 10, x0 + width, y + 2]);
      labels.appendChild(
        el(
          "text",
          { class: "point-label", x: right ? cx + 8 : cx - 8, y, "text-anchor": right ? "start" : "end" },
          p.label,
        ),
      );
    }
    svg.appendChild(g);
    svg.appendChild(labels);
    svg.setAttribute("data-points", String(pts.length));
    return svg;
  }

  window.GFCharts = { timeSeries, scatter, niceTicks };
})();
