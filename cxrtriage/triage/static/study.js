// The study page: one study's results and the reader's claim/unclaim/read actions (a file: CSP 'self' only).
const uid = decodeURIComponent(location.pathname.split("/").pop());
document.getElementById("reader").value = localStorage.getItem("cxrtriage-reader") || "";
async function load() {
  const s = await (await fetch(`/api/studies/${encodeURIComponent(uid)}`)).json();
  document.getElementById("title").textContent = `Accession ${s.accession_number || "(none)"}: ${s.band.replace("_", " ")}`;
  document.getElementById("summary").innerHTML = `
    ${lungDiagram(s.zone_brixia.length ? s.zone_brixia : null, 150)}
    <table>
      <tr><th>Zone score</th><td>${scoreText(s)}</td></tr>
      <tr><th>Brixia-style</th><td>${s.brixia_total ?? "-"}/18</td></tr>
      <tr><th>P(disease)</th><td>${s.p_disease === null ? "-" : s.p_disease.toFixed(3)}</td></tr>
      <tr><th>Zones (0/1)</th><td>${s.zone_binary.map((z) => z ?? "-").join(" ") || "-"}</td></tr>
      <tr><th>Waiting</th><td>${minutes(s.waited_minutes)}</td></tr>
      <tr><th>Flags</th><td>${s.flags.map(escapeHtml).join(", ") || "none"}</td></tr>
      <tr><th>Models</th><td id="models">${modelList(s)}</td></tr>
      <tr><th>State</th><td id="state">${escapeHtml(s.reading_state)}${s.reader ? " (" + escapeHtml(s.reader) + ")" : ""}</td></tr>
    </table>`;
  const banner = document.getElementById("research-banner");
  banner.hidden = !s.research_use;
  banner.textContent = s.research_use ? `${s.research_use_notice}. Severity is for research use, not for clinical triage.` : "";
  document.getElementById("images").innerHTML = s.image_results.map((im) => im.status === "scored"
      ? `<img alt="overlay" src="/api/images/${encodeURIComponent(im.sop_instance_uid)}/overlay.png">`
      : `<p>Image ${escapeHtml(im.view_position)}: ${escapeHtml(im.status)} ${escapeHtml(im.reason)} ${escapeHtml(im.message)}</p>`).join("");
}
function modelList(s) {
  // Every model behind this study's results: name, version, who made it, what it was trained on.
  const seen = new Map();
  for (const im of s.image_results) {
    const identity = im.scores && im.scores.model_identity;
    if (!identity) continue;
    for (const stage of ["lungs", "disease"]) {
      const m = identity[stage];
      seen.set(`${stage}|${m.version}`, `${stage}: <b>${escapeHtml(m.name)}</b> (${escapeHtml(m.version)}; ${escapeHtml(m.origin)}; trained on ${escapeHtml((m.training_data || []).join(" + ") || "data not stated")})`);
    }
  }
  return [...seen.values()].join("<br>") || "-";
}
for (const action of ["claim", "unclaim", "read"]) {
  document.getElementById(action).addEventListener("click", async () => {
    const reader = document.getElementById("reader").value.trim();
    localStorage.setItem("cxrtriage-reader", reader);
    const r = await fetch(`/api/studies/${encodeURIComponent(uid)}/${action}`,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reader }) });
    document.getElementById("message").textContent = r.ok ? `${action}: done` : (await r.json()).detail;
    load();
  });
}
load();
