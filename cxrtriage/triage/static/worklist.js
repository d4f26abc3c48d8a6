// The worklist page: polls the API every two seconds (a file, not inline: the CSP allows only 'self' scripts).
async function refresh() {
  const params = new URLSearchParams({ limit: "200" });  // the top of the list; ranking still sees every study
  for (const id of ["band", "modality"]) { const v = document.getElementById(id).value; if (v) params.set(id, v); }
  if (document.getElementById("unread").checked) params.set("unread_only", "true");
  const response = await fetch("/api/worklist?" + params.toString());
  if (!response.ok) { document.getElementById("status").textContent = "offline"; return; }
  const studies = await response.json();
  const rows = studies.map((s, i) => `
    <tr class="band-${s.band}" data-study="${escapeHtml(s.study_instance_uid)}">
      <td>${i + 1}</td>
      <td><span class="badge band-${s.band}">${s.band.replace("_", " ")}</span></td>
      <td>${lungDiagram(s.zone_brixia.length ? s.zone_brixia : null, 48)}</td>
      <td>${scoreText(s)}</td>
      <td>${s.brixia_total ?? "-"}/18</td>
      <td>${s.p_disease === null ? "-" : s.p_disease.toFixed(2)}</td>
      <td>${minutes(s.waited_minutes)}</td>
      <td>${flagBadges(s.flags)}${researchBadge(s)}</td>
      <td class="patient">${escapeHtml(patientText(s))}</td>
      <td><a href="/studies/${encodeURIComponent(s.study_instance_uid)}">${escapeHtml(s.accession_number || "(none)")}</a></td>
      <td>${escapeHtml(s.study_date)}</td>
      <td>${escapeHtml(s.reading_state)}${s.reader ? " (" + escapeHtml(s.reader) + ")" : ""}</td>
    </tr>`);
  document.querySelector("#worklist tbody").innerHTML = rows.join("");
  // The notice stays on screen while any listed result came from models never trained on real radiographs.
  const research = studies.filter((s) => s.research_use);
  const banner = document.getElementById("research-banner");
  banner.hidden = research.length === 0;
  if (research.length) {
    const models = [...new Set(research.flatMap((s) => s.models))].join("; ");
    banner.textContent = `${research[0].research_use_notice}. ${research.length} of ${studies.length} studies were scored by: ${models}. Severity is for research use, not for clinical triage.`;
  }
  document.getElementById("status").textContent = `${studies.length} studies, updated ${new Date().toLocaleTimeString()}`;
  await showDestinations();
  await showNodes();
}

// The live nodes sharing this node's database (docs/deploy.md): names, roles, and who runs the periodic jobs.
async function showNodes() {
  const response = await fetch("/api/nodes");
  if (!response.ok) return;
  const nodes = await response.json();
  const box = document.getElementById("nodes");
  box.querySelector("summary").textContent = `Nodes (${nodes.length} live)`;
  box.querySelector("ul").replaceChildren(...nodes.map((n) => {
    const item = document.createElement("li");
    item.textContent = `${n.name}: ${n.roles.join(", ")}${n.leader ? " (runs escalation, retries, purge)" : ""}`
      + ` · version ${n.version} · seen ${Math.round(n.seconds_since_seen)} s ago`;
    return item;
  }));
}

// A destination whose circuit is open is backing off: results wait in its outbox, none are lost.
async function showDestinations() {
  const response = await fetch("/api/destinations");
  if (!response.ok) return;
  const down = (await response.json()).filter((d) => d.state !== "closed");
  const line = document.getElementById("destinations");
  line.hidden = down.length === 0;
  line.textContent = down.map((d) => `Sending to ${d.destination} is paused after ${d.consecutive_failures} failures`
    + (d.state === "open" ? `: next try in ${Math.ceil(d.retry_in_seconds)} s` : ": trying one object")).join(" · ");
}
renderLegend(document.getElementById("legend"));
for (const id of ["band", "modality", "unread"]) document.getElementById(id).addEventListener("change", refresh);
refresh();
setInterval(refresh, 2000);
