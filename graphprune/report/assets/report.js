// graphprune HTML report: click a group row to highlight the tensors carrying that group in the graph.
(function () {
  "use strict";
  var wrap = document.querySelector(".gp-graph-wrap");
  var rows = document.querySelectorAll("tr.grp");
  var current = null;
  function select(row) {
    rows.forEach(function (r) { r.classList.remove("sel"); });
    if (!wrap) { return; }
    wrap.querySelectorAll(".edge.hl").forEach(function (e) { e.classList.remove("hl"); });
    if (current === row) { current = null; wrap.classList.remove("dim"); return; }
    current = row;
    row.classList.add("sel");
    var edges = wrap.querySelectorAll(".edge.g" + row.getAttribute("data-group"));
    edges.forEach(function (e) { e.classList.add("hl"); });
    wrap.classList.add("dim");
    if (edges.length) { edges[0].scrollIntoView({ block: "center", inline: "center" }); }
  }
  rows.forEach(function (r) { r.addEventListener("click", function () { select(r); }); });
  var toggle = document.getElementById("only-frozen");
  if (toggle) {
    toggle.addEventListener("change", function () {
      rows.forEach(function (r) { r.style.display = toggle.checked && !r.classList.contains("frozen") ? "none" : ""; });
    });
  }
})();
