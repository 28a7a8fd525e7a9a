// A small line chart on <canvas>: loss (left axis, auto range) and accuracy (right axis, 0-100%) per step.
// The canvas is decorative for screen readers; the caller keeps the latest numbers in text next to it.

const SERIES = [
  { key: "loss", label: "loss", color: "#b4451f", axis: "left", dash: [] },
  { key: "train_accuracy", label: "train accuracy", color: "#1f5fb4", axis: "right", dash: [6, 3] },
];

export class TrainingChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];
    this.totalSteps = null;
    this.resize = () => this.draw();
    window.addEventListener("resize", this.resize);
  }

  destroy() { window.removeEventListener("resize", this.resize); }

  set(points, totalSteps) {
    this.points = points.filter((p) => typeof p.step === "number");
    if (totalSteps) this.totalSteps = totalSteps;
    this.draw();
  }

  push(point, totalSteps) {
    if (typeof point.step !== "number") return;
    const last = this.points[this.points.length - 1];
    if (last && last.step === point.step) this.points[this.points.length - 1] = point;
    else if (!last || point.step > last.step) this.points.push(point);
    if (totalSteps) this.totalSteps = totalSteps;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 600, height = canvas.clientHeight || 220;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const pad = { left: 48, right: 48, top: 12, bottom: 28 };
    const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
    const pts = this.points;
    // the x axis spans the steps seen so far (a live run of 3000 steps is not a sliver at the left edge)
    const minStep = pts.length ? pts[0].step : 0;
    const maxStep = Math.max(pts.length ? pts[pts.length - 1].step : 1, minStep + 1);
    const losses = pts.map((p) => p.loss).filter((v) => typeof v === "number" && isFinite(v));
    const lossMax = losses.length ? Math.max(...losses) * 1.1 || 1 : 1;
    const x = (step) => pad.left + ((step - minStep) / (maxStep - minStep)) * plotW;
    const yLeft = (v) => pad.top + plotH - (v / lossMax) * plotH;
    const yRight = (v) => pad.top + plotH - v * plotH;

    ctx.font = "12px system-ui, sans-serif";
    ctx.strokeStyle = "#d0d4da";
    ctx.fillStyle = "#4a525c";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {  // grid and both axes' tick labels
      const y = pad.top + (plotH * i) / 4;
      ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(pad.left + plotW, y); ctx.stroke();
      ctx.textAlign = "right";
      ctx.fillText((lossMax * (1 - i / 4)).toFixed(2), pad.left - 6, y + 4);
      ctx.textAlign = "left";
      ctx.fillText(`${100 - i * 25}%`, pad.left + plotW + 6, y + 4);
    }
    ctx.textAlign = "center";
    ctx.textAlign = "left";
    if (pts.length) ctx.fillText(String(minStep), pad.left, height - 6);
    ctx.textAlign = "right";
    if (pts.length) ctx.fillText(String(maxStep), pad.left + plotW, height - 6);
    ctx.textAlign = "center";
    ctx.fillText(this.totalSteps ? `step (of ${this.totalSteps})` : "step", pad.left + plotW / 2, height - 6);
    if (!pts.length) {
      ctx.fillText("waiting for the first step…", pad.left + plotW / 2, pad.top + plotH / 2);
      return;
    }
    for (const s of SERIES) {
      const y = s.axis === "left" ? yLeft : yRight;
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 2;
      ctx.setLineDash(s.dash);
      ctx.beginPath();
      let started = false;
      for (const p of pts) {
        const v = p[s.key];
        if (typeof v !== "number" || !isFinite(v)) continue;
        if (started) ctx.lineTo(x(p.step), y(v)); else { ctx.moveTo(x(p.step), y(v)); started = true; }
      }
      ctx.stroke();
      if (pts.length === 1 && started) {  // one point: a dot, or nothing would show
        ctx.fillStyle = s.color;
        ctx.beginPath(); ctx.arc(x(pts[0].step), y(pts[0][s.key]), 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
    ctx.setLineDash([]);
  }
}

export const CHART_LEGEND = SERIES;
