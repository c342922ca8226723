// The carrot monitor's live refresh: fetch the page again and swap its [data-live] regions.
// One request at a time, paused while the tab is hidden, while rows are selected, or when
// the viewer turns it off.
(function () {
  'use strict';
  var seconds = parseInt(document.body.getAttribute('data-refresh') || '0', 10);
  var toggle = document.querySelector('[data-live-toggle]');
  var busy = false;
  var on = seconds > 0;
  var timer = null;

  function selecting() {
    return document.querySelector('input[name="ids"][type="checkbox"]:checked') !== null;
  }

  function schedule() {
    clearTimeout(timer);
    if (on && document.visibilityState === 'visible') {
      timer = setTimeout(refresh, seconds * 1000);
    }
  }

  function refresh() {
    if (busy || !on || document.visibilityState !== 'visible' || selecting()) {
      schedule();
      return;
    }
    busy = true;
    fetch(window.location.href, {credentials: 'same-origin',
                                 headers: {'X-Carrot-Refresh': '1'}})
      .then(function (response) {
        if (!response.ok) { throw new Error(String(response.status)); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, 'text/html');
        document.querySelectorAll('[data-live]').forEach(function (region) {
          var replacement = fresh.getElementById(region.id);
          if (replacement) { region.replaceWith(replacement); }
        });
        if (!fresh.body.getAttribute('data-refresh') ||
            fresh.body.getAttribute('data-refresh') === '0') {
          on = false;  // the task finished: nothing more will change
          if (toggle) { toggle.setAttribute('aria-pressed', 'false'); }
        }
      })
      .catch(function () { /* try again at the next tick */ })
      .then(function () { busy = false; schedule(); });
  }

  if (toggle) {
    toggle.addEventListener('click', function () {
      on = !on;
      toggle.setAttribute('aria-pressed', on ? 'true' : 'false');
      if (on) { refresh(); } else { clearTimeout(timer); }
    });
  }
  document.addEventListener('visibilitychange', function () {
    if (document.visibilityState === 'visible') { refresh(); } else { clearTimeout(timer); }
  });

  // Confirmation of buttons that say data-confirm, and "select all".
  document.addEventListener('submit', function (event) {
    var button = event.submitter;
    var question = button && button.getAttribute('data-confirm');
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });
  document.addEventListener('change', function (event) {
    var box = event.target;
    if (box.hasAttribute && box.hasAttribute('data-select-all')) {
      document.querySelectorAll('input[name="ids"][type="checkbox"]').forEach(function (one) {
        one.checked = box.checked;
      });
    }
  });
  schedule();
})();
