// Shows data.json ({questions: [{id, category, question, answers, evaluations, scores}], models}) one question
// at a time: "ours" beside the chosen model, with the judge's review and the two scores.
"use strict";

const $ = (id) => document.getElementById(id);
let data = { questions: [], models: [] };
let shown = [];

function boldToHtml(text) {
  // the generator marks **Assistant 1** / **Assistant 2**; everything else is shown as text
  const div = document.createElement("div");
  text.split(/(\*\*[^*]+\*\*)/).forEach((part) => {
    const bold = part.startsWith("**") && part.endsWith("**");
    const node = bold ? document.createElement("strong") : document.createTextNode(part);
    if (bold) node.textContent = part.slice(2, -2);
    div.appendChild(node);
  });
  return div;
}

function fill(select, values, labels) {
  select.replaceChildren(...values.map((v, i) => new Option(labels ? labels[i] : v, v)));
}

function filter() {
  const cat = $("category").value;
  shown = data.questions.filter((q) => cat === "all" || q.category === cat);
  fill($("question"), shown.map((q) => String(q.id)), shown.map((q) => `${q.id}: ${q.question.slice(0, 60)}`));
  render();
}

function render() {
  const q = shown.find((x) => String(x.id) === $("question").value);
  if (!q) return;
  const model = $("model").value;
  $("question-text").textContent = q.question;
  $("other-name").textContent = model;
  $("other-answer").textContent = q.answers[model] ?? "";
  $("our-answer").textContent = q.answers.ours ?? "";
  const scores = (q.scores || {})[model] || [];
  $("other-score").textContent = scores.length ? scores[0] : "-";
  $("our-score").textContent = scores.length ? scores[1] : "-";
  $("review").replaceChildren(boldToHtml((q.evaluations || {})[model] || "(no review)"));
}

function step(delta) {
  const i = shown.findIndex((x) => String(x.id) === $("question").value);
  const next = shown[(i + delta + shown.length) % shown.length];
  if (next) { $("question").value = String(next.id); render(); }
}

fetch("data.json")
  .then((r) => r.json())
  .then((json) => {
    data = json;
    const cats = ["all", ...new Set(data.questions.map((q) => q.category))];
    fill($("category"), cats);
    fill($("model"), data.models);
    $("category").onchange = filter;
    $("question").onchange = render;
    $("model").onchange = render;
    $("prev").onclick = () => step(-1);
    $("next").onclick = () => step(1);
    filter();
    $("status").textContent = `${data.questions.length} questions`;
  })
  .catch((e) => { $("status").textContent = `cannot load data.json: ${e}`; });
