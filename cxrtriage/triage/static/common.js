// Shared by the worklist and the study page: zone diagram and formatting.
const GRADE_COLOURS = ["#2e7d32", "#f9a825", "#ef6c00", "#c62828"];

function lungDiagram(brixia, size) {
  // Six zones, patient right (A-C) drawn on the viewer's left as on a PA film.
  const w = size || 60, h = Math.round((w * 5) / 6), zw = w / 2 - 3, zh = h / 3 - 2;
  let svg = `<svg class="lungs" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="zone grades">`;
  for (let k = 0; k < 6; k++) {
    const x = k < 3 ? 1 : w / 2 + 2, y = (k % 3) * (zh + 2) + 1;
    const grade = brixia && brixia.length === 6 ? brixia[k] : null;
    const fill = grade === null ? "#555" : GRADE_COLOURS[grade];
    const letter = "ABCDEF"[k];
    svg += `<rect x="${x}" y="${y}" width="${zw}" height="${zh}" rx="3" fill="${fill}"><title>Zone ${letter}: grade ${grade ?? "-"}</title></rect>`;
    svg += `<text x="${x + zw / 2}" y="${y + zh / 2 + 4}" text-anchor="middle" font-size="10" fill="#fff">${letter}</text>`;
  }
  return svg + "</svg>";
}

function minutes(m) {
  if (m < 60) return `${Math.round(m)} min`;
  return `${Math.floor(m / 60)} h ${Math.round(m % 60)} min`;
}

function escapeHtml(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function scoreText(s) {
  // "4/6", or "2/3 (one lung)" when only one lung was found: unscored zones are not clear.
  if (s.total_score === null || s.total_score === undefined) return "-";
  const zones = s.zones_scored ?? 6;
  return zones === 6 ? `${s.total_score}/6` : `${s.total_score}/${zones} <span class="badge flag-missing-lung">${escapeHtml((s.missing_lungs || []).join(" + "))} lung not found</span>`;
}

function researchBadge(s) {
  return s.research_use ? `<span class="badge research-use" title="${escapeHtml(s.research_use_notice)}">research use</span>` : "";
}

function flagBadges(flags) {
  return flags.map((f) => `<span class="badge flag-${f.replaceAll(" ", "-")}">${escapeHtml(f)}</span>`).join("");
}
