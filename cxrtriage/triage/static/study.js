// The study page: one study's results, its images (overlay or plain, zoomable) and the reader's
// claim/unclaim/read actions (a file: CSP 'self' only).
const uid = decodeURIComponent(location.pathname.split("/").pop());
const readerInput = document.getElementById("reader");
readerInput.value = localStorage.getItem("cxrtriage-reader") || "";
let signedIn = false;

async function whoami() {
  // With web.readers / web.token the node knows who you are: no name to type (and none to fake).
  const r = await fetch("/api/me");
  if (!r.ok) return;
  const me = await r.json();
  signedIn = me.authenticated;
  document.getElementById("reader-label").hidden = signedIn;
  const who = document.getElementById("whoami");
  who.hidden = !signedIn;
  who.textContent = me.reader ? `Signed in as ${me.reader}` : "Signed in without a reader name: claims need your own";
}

async function load() {
  const s = await (await fetch(`/api/studies/${encodeURIComponent(uid)}`)).json();
  document.getElementById("title").textContent = `Accession ${s.accession_number || "(none)"}: ${s.band.replace("_", " ")}`;
  const patient = patientText(s);
  document.getElementById("patient").textContent = patient ? `Patient ${patient}` : "";
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
  showImages(s.image_results);
}

function showImages(images) {
  // Drawn once per image set: a reload after claiming keeps the reader's zoom and view.
  const box = document.getElementById("images");
  const key = images.map((im) => im.sop_instance_uid + im.status).join("|");
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.innerHTML = "";
  for (const im of images) {
    if (im.status !== "scored") {
      const note = document.createElement("p");
      note.textContent = `Image ${im.view_position}: ${im.status} ${im.reason} ${im.message}`;
      box.appendChild(note);
    }
    if (im.status !== "pending") box.appendChild(viewer(im));
  }
}

function viewer(im) {
  // One image: the overlay (when scored) or the plain radiograph, toggled; zoom by buttons or the wheel.
  const sop = encodeURIComponent(im.sop_instance_uid);
  const urls = { overlay: `/api/images/${sop}/overlay.png`, plain: `/api/images/${sop}/image.png` };
  let view = im.status === "scored" ? "overlay" : "plain", zoom = 1;
  const figure = document.createElement("figure");
  figure.className = "viewer";
  figure.innerHTML = `<div class="tools">
      <button class="toggle"></button> <button class="zoom-out" title="zoom out">&minus;</button>
      <button class="zoom-in" title="zoom in">+</button> <button class="zoom-fit">fit</button> <span class="zoom-level"></span>
    </div><div class="frame"><img alt=""></div>`;
  const img = figure.querySelector("img"), toggle = figure.querySelector(".toggle");
  const draw = () => {
    img.src = urls[view];
    img.alt = view === "overlay" ? "overlay" : "radiograph";
    img.dataset.view = view;
    toggle.textContent = view === "overlay" ? "Show plain image" : "Show overlay";
    toggle.hidden = im.status !== "scored";
    img.style.width = `${Math.round(zoom * 100)}%`;  // CSSOM, not an inline style attribute: the CSP allows it
    figure.querySelector(".zoom-level").textContent = `${Math.round(zoom * 100)}%`;
  };
  const zoomBy = (factor) => { zoom = Math.min(8, Math.max(1, zoom * factor)); draw(); };
  toggle.addEventListener("click", () => { view = view === "overlay" ? "plain" : "overlay"; draw(); });
  img.addEventListener("click", () => toggle.click());
  figure.querySelector(".zoom-in").addEventListener("click", () => zoomBy(1.5));
  figure.querySelector(".zoom-out").addEventListener("click", () => zoomBy(1 / 1.5));
  figure.querySelector(".zoom-fit").addEventListener("click", () => { zoom = 1; draw(); });
  figure.querySelector(".frame").addEventListener("wheel", (e) => { e.preventDefault(); zoomBy(e.deltaY < 0 ? 1.25 : 0.8); },
    { passive: false });
  draw();
  return figure;
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
    // Signed in, the node takes the reader from the credentials; otherwise the typed name is sent.
    const reader = signedIn ? "" : readerInput.value.trim();
    if (!signedIn) localStorage.setItem("cxrtriage-reader", reader);
    const r = await fetch(`/api/studies/${encodeURIComponent(uid)}/${action}`,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reader }) });
    document.getElementById("message").textContent = r.ok ? `${action}: done` : (await r.json()).detail;
    load();
  });
}
renderLegend(document.getElementById("legend"));
whoami();
load();
