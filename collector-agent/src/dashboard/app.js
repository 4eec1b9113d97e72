// Draws the consent-rate chart from the JSON the page embeds (#rates-data) with the
// vendored uPlot. The same figures are in the table below the chart.
(function () {
  'use strict';
  var el = document.getElementById('rates-chart');
  var src = document.getElementById('rates-data');
  if (!el || !src || typeof uPlot === 'undefined') return;
  var d = JSON.parse(src.textContent);
  if (!d.days.length) {
    el.textContent = 'No visitor decisions in this window yet.';
    el.setAttribute('role', 'note');
    el.classList.remove('chart');
    return;
  }
  // Dark, distinct colours (each ≥ 4.5:1 on white) and dashes, so series differ
  // without relying on colour alone.
  var colours = ['#0b57d0', '#b3261e', '#146c2e', '#8a4b00', '#6a1b9a', '#00695c', '#37474f', '#ad1457'];
  var dashes = [[], [8, 4], [2, 3], [12, 4, 2, 4], [4, 4], [1, 5], [10, 2], [6, 2, 2, 2]];
  var xs = d.days.map(function (day) { return Date.parse(day + 'T00:00:00Z') / 1000; });
  var series = [{ label: 'day' }];
  d.categories.forEach(function (c, i) {
    series.push({
      label: c,
      stroke: colours[i % colours.length],
      dash: dashes[i % dashes.length],
      width: 2,
      points: { show: true, size: 6 },
      value: function (u, v) { return v == null ? '–' : v.toFixed(1) + '%'; }
    });
  });
  var width = Math.max(320, el.clientWidth || 900);
  var chart = new uPlot({
    width: width,
    height: 300,
    // A fixed frame: the days shown, with a day of margin each side.
    scales: { x: { time: true, range: [xs[0] - 86400, xs[xs.length - 1] + 86400] }, y: { range: [0, 100] } },
    axes: [
      { stroke: '#1a1a1a' },
      { stroke: '#1a1a1a', values: function (u, ticks) { return ticks.map(function (t) { return t + '%'; }); } }
    ],
    series: series
  }, [xs].concat(d.percent), el);
  // uPlot's legend is a table: give it a caption like every other table.
  var legend = el.querySelector('table');
  if (legend && !legend.caption) {
    legend.createCaption().textContent = 'Legend: the value under the cursor, per category';
  }
  window.addEventListener('resize', function () {
    chart.setSize({ width: Math.max(320, el.clientWidth || 900), height: 300 });
  });
  el.dataset.drawn = 'true';
})();
