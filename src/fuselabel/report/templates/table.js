// Sorts a table.sortable by the column whose heading is clicked (numbers as numbers), and keeps only the rows
// that hold the text typed in the input.filter naming it (data-table).
document.querySelectorAll("table.sortable").forEach(function (table) {
  var body = table.tBodies[0];
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var key = function (tr) { var t = tr.cells[col].textContent.trim(), n = parseFloat(t); return isNaN(n) ? t.toLowerCase() : n; };
      Array.from(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      }).forEach(function (tr) { body.appendChild(tr); });
    });
  });
});
document.querySelectorAll("input.filter").forEach(function (input) {
  var body = document.getElementById(input.dataset.table).tBodies[0];
  input.addEventListener("input", function () {
    var want = input.value.trim().toLowerCase();
    Array.from(body.rows).forEach(function (tr) { tr.hidden = want !== "" && tr.textContent.toLowerCase().indexOf(want) < 0; });
  });
});
