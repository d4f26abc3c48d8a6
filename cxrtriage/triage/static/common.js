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

function personName(pn) {
  // DICOM PN (PS3.5 6.2): Family^Given^Middle^Prefix^Suffix, shown as "DOE, Jane M".
  const [family, given, middle, prefix, suffix] = String(pn ?? "").split("=")[0].split("^").map((p) => p.trim());
  const rest = [prefix, given, middle, suffix].filter(Boolean).join(" ");
  return family && rest ? `${family}, ${rest}` : family || rest || "";
}

function patientText(s) {
  // Empty when the node hides patient identity (web.show_patient_identity: false).
  const name = personName(s.patient_name);
  if (!name && !s.patient_id) return "";
  return s.patient_id ? `${name || "(no name)"} · ID ${s.patient_id}` : name;
}

function renderLegend(element) {
  // What the colours and abbreviations mean; the same on both pages.
  const chip = (grade) => `<svg class="chip" width="14" height="14" viewBox="0 0 14 14"><rect width="14" height="14" rx="3" fill="${grade === null ? "#555" : GRADE_COLOURS[grade]}"/></svg>`;
  element.innerHTML = `<summary>Legend</summary>
    <dl>
      <dt>Severity band</dt><dd>${["critical", "high", "moderate", "low"].map((b) => `<span class="badge band-${b}">${b}</span>`).join("")}
        <span class="badge band-unscored">AI pending / failed</span> the row's left edge has the same colour. Rows are in reading order: the band and the severity within it give a start priority that rises with waiting time; an urgent order never ranks lower than its priority.</dd>
      <dt>Zones A-F</dt><dd>${lungDiagram([0, 1, 2, 3, null, 0], 36)} six zones as on a PA film: A-C the patient's right lung
        (drawn on the left), upper to lower; D-F the left lung. Colour = Brixia-style grade, by the share of the zone opacified:
        ${chip(0)} 0 (up to 5%) ${chip(1)} 1 (up to 30%) ${chip(2)} 2 (up to 60%) ${chip(3)} 3 (more) ${chip(null)} not scored (lung not found).</dd>
      <dt>Score</dt><dd>zone score 0-6: the number of zones opacified beyond the model's threshold (Danilov et al. 2022); "x/3" when only one lung was found.</dd>
      <dt>Brixia-style</dt><dd>the six grades added up, 0-18 (extent only: the real Brixia score grades the type of abnormality).</dd>
      <dt>Overlay labels</dt><dd><code>A 12% s1 g2</code>: zone A, 12% of the zone opacified, <code>s</code> zone score 0/1, <code>g</code> Brixia-style grade 0-3;
        "R" marks the patient's right.
        Lung outlines cyan, zones amber, opacity red.</dd>
      <dt>Flags</dt><dd><span class="badge flag-STAT">STAT</span> urgent order, kept on top; <span class="badge flag-overdue">overdue</span> waited past its band's maximum;
        <span class="badge research-use">research use</span> scored by models never trained on real radiographs.</dd>
    </dl>`;
}
