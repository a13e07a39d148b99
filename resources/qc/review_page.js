// The review page's script (ctcohort.review_page inlines it): filters, larger view, keys, decisions.
// The cards are already in the page in review order; this only reads and marks them.
"use strict";
(function () {
  const settings = JSON.parse(document.getElementById("review-settings").textContent);
  const [SUBJECT, STRUCTURE, DECISION, REASON] = settings.columns;
  const cards = document.getElementById("cards");
  const overlay = document.getElementById("overlay");
  const storageKey = "ctcohort-review\t" + settings.title + "\t" + location.pathname;
  const decisions = new Map(); // subject \t structure -> {subject, structure, decision, reason}
  let selected = null;
  let flagIndex = null; // per card: its [structure, flag] pairs, built on the first filter change

  // --- filters ---------------------------------------------------------------------------------------------
  function buildFlagIndex() {
    return Array.from(cards.children, (card) =>
      Array.from(card.querySelectorAll("[data-flag]"), (el) => [el.closest("li").dataset.structure, el.dataset.flag]));
  }

  function applyFilters() {
    const flag = document.getElementById("flag-filter").value;
    const structure = document.getElementById("structure-filter").value;
    flagIndex = flagIndex || buildFlagIndex();
    const all = flag === "*" && structure === "*";
    let shown = 0;
    Array.prototype.forEach.call(cards.children, (card, i) => {
      const visible = all || flagIndex[i].some(([s, f]) => (structure === "*" || s === structure) && (flag === "*" || f === flag));
      card.hidden = !visible;
      shown += visible;
    });
    document.getElementById("count").textContent = shown;
    if (selected && selected.hidden) select(null);
  }

  // --- selection, larger view, keys ------------------------------------------------------------------------
  function select(card) {
    if (selected) selected.classList.remove("selected");
    selected = card;
    if (card) {
      card.classList.add("selected");
      card.scrollIntoView({ block: "nearest" });
    }
  }

  function visibleNeighbour(card, step) {
    let next = card ? (step > 0 ? card.nextElementSibling : card.previousElementSibling)
                    : (step > 0 ? cards.firstElementChild : cards.lastElementChild);
    while (next && next.hidden) next = step > 0 ? next.nextElementSibling : next.previousElementSibling;
    return next || card;
  }

  function openLarge(img) {
    overlay.querySelector("img").src = img.src;
    overlay.hidden = false;
  }

  function closeLarge() {
    overlay.hidden = true;
    overlay.querySelector("img").removeAttribute("src");
  }

  const KEYS = {
    j: () => select(visibleNeighbour(selected, 1)),
    ArrowDown: () => select(visibleNeighbour(selected, 1)),
    k: () => select(visibleNeighbour(selected, -1)),
    ArrowUp: () => select(visibleNeighbour(selected, -1)),
    x: () => selected && mark(selected, "", settings.decisions[0]),
    a: () => selected && mark(selected, "", settings.decisions[1]),
    Enter: () => selected && selected.querySelector("img.preview") && openLarge(selected.querySelector("img.preview")),
    Escape: () => closeLarge(),
  };

  document.addEventListener("keydown", (event) => {
    const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(event.target.tagName);
    if (typing || event.ctrlKey || event.metaKey || event.altKey || !(event.key in KEYS)) return;
    if (!overlay.hidden && event.key !== "Escape") return;
    event.preventDefault();
    KEYS[event.key]();
  });

  // --- decisions -------------------------------------------------------------------------------------------
  function markedElement(card, structure) {
    if (!structure) return card;
    return Array.from(card.querySelectorAll("li[data-structure]")).find((li) => li.dataset.structure === structure);
  }

  function show(card, structure, decision) {
    const element = markedElement(card, structure);
    if (!element) return;
    settings.decisions.forEach((d) => element.classList.toggle(d, d === decision));
    const buttons = structure ? element.querySelectorAll(":scope > button") : card.querySelectorAll(".scan-decision button");
    buttons.forEach((b) => b.classList.toggle("pressed", b.className.split(" ")[0] === decision));
  }

  // a second click on the same decision takes it back
  function mark(card, structure, decision) {
    const subject = card.dataset.subject;
    const key = subject + "\t" + structure;
    const same = decisions.has(key) && decisions.get(key).decision === decision;
    if (same) decisions.delete(key);
    else decisions.set(key, { subject, structure, decision, reason: card.querySelector(".reason").value });
    show(card, structure, same ? "" : decision);
    saved();
  }

  function saved() {
    document.getElementById("decided").textContent = decisions.size + (decisions.size === 1 ? " decision" : " decisions");
    try { localStorage.setItem(storageKey, JSON.stringify(Array.from(decisions.values()))); } catch (e) { /* storage off */ }
  }

  cards.addEventListener("click", (event) => {
    const card = event.target.closest(".card");
    if (!card) return;
    if (card !== selected) select(card);
    if (event.target.matches("img.preview")) openLarge(event.target);
    if (event.target.matches("button")) {
      const li = event.target.closest("li[data-structure]");
      mark(card, li ? li.dataset.structure : "", event.target.className.split(" ")[0]);
    }
  });

  cards.addEventListener("change", (event) => {
    if (!event.target.matches(".reason")) return;
    const subject = event.target.closest(".card").dataset.subject;
    decisions.forEach((d) => { if (d.subject === subject) d.reason = event.target.value; });
    saved();
  });

  overlay.addEventListener("click", closeLarge);

  function clean(text) {
    return String(text).replace(/[\t\r\n]+/g, " ").trim();
  }

  // decisions in card order, the whole scan before its structures
  function decisionsTsv() {
    const order = new Map(Array.from(cards.children, (card, i) => [card.dataset.subject, i]));
    const rows = Array.from(decisions.values()).sort((p, q) =>
      (order.get(p.subject) - order.get(q.subject)) || (p.structure < q.structure ? -1 : p.structure > q.structure ? 1 : 0));
    const lines = rows.map((d) => [d.subject, d.structure, d.decision, d.reason].map(clean).join("\t"));
    return [settings.columns.join("\t"), ...lines].join("\n") + "\n";
  }

  document.getElementById("download").addEventListener("click", () => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([decisionsTsv()], { type: "text/tab-separated-values" }));
    link.download = settings.file;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  });

  // earlier decisions: from localStorage on opening, or a decisions TSV loaded by the reviewer
  function restore(rows) {
    if (!rows.length) return 0;
    const bySubject = new Map(Array.from(cards.children, (card) => [card.dataset.subject, card]));
    let unknown = 0;
    rows.forEach((d) => {
      const card = bySubject.get(d.subject);
      if (!card || !markedElement(card, d.structure)) { unknown += 1; return; }
      decisions.set(d.subject + "\t" + d.structure, d);
      show(card, d.structure, d.decision);
      if (d.reason) card.querySelector(".reason").value = d.reason;
    });
    saved();
    return unknown;
  }

  function parseTsv(text) {
    const lines = text.replace(/^\ufeff/, "").split(/\r?\n/).filter((line) => line.trim());
    const header = (lines.shift() || "").split("\t").map((name) => name.trim());
    const at = Object.fromEntries(settings.columns.map((c) => [c, header.indexOf(c)]));
    if (Object.values(at).some((i) => i < 0)) throw new Error("the header must name " + settings.columns.join(", "));
    return lines.map((line, n) => {
      const fields = line.split("\t");
      const row = Object.fromEntries(settings.columns.map((c) => [c, (fields[at[c]] || "").trim()]));
      row[DECISION] = row[DECISION].toLowerCase();
      if (!row[SUBJECT] || !settings.decisions.includes(row[DECISION])) throw new Error("line " + (n + 2) + " is not a decision");
      return { subject: row[SUBJECT], structure: row[STRUCTURE], decision: row[DECISION], reason: row[REASON] };
    });
  }

  document.getElementById("load").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file) return;
    file.text().then((text) => {
      try {
        const unknown = restore(parseTsv(text));
        if (unknown) alert(unknown + " decision(s) name a scan or structure that this page does not show; left out");
      } catch (e) { alert(file.name + ": " + e.message); }
      event.target.value = "";
    });
  });

  document.getElementById("flag-filter").addEventListener("change", applyFilters);
  document.getElementById("structure-filter").addEventListener("change", applyFilters);
  try { restore(JSON.parse(localStorage.getItem(storageKey) || "[]")); } catch (e) { /* nothing kept */ }
})();
