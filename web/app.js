// broker's admin console: plain JavaScript over the same JSON API as curl.
'use strict';

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
};
// The admin token lives in sessionStorage only: never in a URL or a cookie.
const token = () => sessionStorage.getItem('adminToken');

// api posts body as JSON and returns the decoded answer, or throws an Error with the
// server's message.
async function api(path, body, headers = {}) {
  const resp = await fetch(path, {
    method: 'POST',
    headers: Object.assign({ 'Content-Type': 'application/json' }, headers),
    body: JSON.stringify(body),
  });
  const out = await resp.json().catch(() => ({}));
  if (!resp.ok) throw Object.assign(new Error(out.error || resp.statusText), { status: resp.status });
  return out;
}
const admin = (path, body = {}) => api(path, Object.assign({ admin_token: token() }, body));

// ---- sign in ----

function showApp(on) {
  $('#signin').hidden = on;
  $('#tabs').hidden = !on;
  showTab(on ? 'users' : null);
}

function showTab(name) {
  for (const b of document.querySelectorAll('#tabs [data-tab]')) {
    b.setAttribute('aria-pressed', String(b.dataset.tab === name));
    $('#' + b.dataset.tab).hidden = b.dataset.tab !== name;
  }
}

$('#signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('#signin-error').textContent = '';
  sessionStorage.setItem('adminToken', $('#admin-token').value);
  try {
    await loadUsers();
    $('#admin-token').value = '';
    showApp(true);
  } catch (err) {
    sessionStorage.removeItem('adminToken');
    $('#signin-error').textContent = err.status === 401 ? 'Wrong admin token.' : err.message;
  }
});

$('#signout').addEventListener('click', () => {
  sessionStorage.removeItem('adminToken');
  stopWatching();
  showApp(false);
  $('#admin-token').focus();
});

for (const b of document.querySelectorAll('#tabs [data-tab]')) {
  b.addEventListener('click', () => showTab(b.dataset.tab));
}

// ---- users ----

let users = [];
let editing = null; // the user open in the form, or null for a new one

async function loadUsers() {
  const tenant = $('#filter-tenant').value.trim();
  users = await admin('/list_users', tenant ? { tenant_name: tenant } : {});
  renderUsers();
}

function renderUsers() {
  const q = $('#search').value.trim().toLowerCase();
  const rows = users
    .filter((u) => !q || u.username.toLowerCase().includes(q) || (u.email || '').toLowerCase().includes(q))
    .sort((a, b) => a.username.localeCompare(b.username))
    .map((u) => {
      const tr = el('tr', { tabIndex: 0 },
        el('td', {}, u.username), el('td', {}, u.tenant_name), el('td', {}, u.email || ''),
        el('td', {}, (u.scopes || []).join(' ')), el('td', {}, u.two_factor ? 'on' : ''),
        el('td', { className: u.revoked ? 'revoked' : '' }, u.revoked ? 'revoked' : 'active'));
      tr.dataset.username = u.username;
      tr.addEventListener('click', () => openUser(u));
      tr.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); openUser(u); } });
      return tr;
    });
  $('#user-table tbody').replaceChildren(...rows);
}

$('#filter-tenant').addEventListener('change', () => loadUsers().catch(showUsersError));
$('#search').addEventListener('input', renderUsers);
$('#new-user').addEventListener('click', () => openUser(null));
$('#cancel-user').addEventListener('click', () => { $('#user-form').hidden = true; });

function showUsersError(err) { $('#users-error').textContent = err.message; }

function clearErrors() {
  for (const p of document.querySelectorAll('#user-form .error')) p.textContent = '';
}

function openUser(u) {
  editing = u;
  clearErrors();
  const f = $('#user-form');
  f.hidden = false;
  $('#user-form-title').textContent = u ? 'User ' + u.username : 'New user';
  $('#f-username').value = u ? u.username : '';
  $('#f-username').readOnly = !!u;
  $('#f-tenant').value = u ? u.tenant_name : $('#filter-tenant').value.trim();
  $('#f-password').value = '';
  $('#f-password').required = !u;
  $('#password-hint').textContent = u ? 'Leave empty to keep the password; a new one ends the user\'s sessions.' : '';
  $('#f-email').value = u ? u.email || '' : '';
  $('#f-scopes').value = u ? (u.scopes || []).join(' ') : '';
  $('#f-data').value = u && u.data !== null ? JSON.stringify(u.data) : '';
  $('#f-two-factor').checked = !!(u && u.two_factor);
  $('#revoke').hidden = !u;
  $('#revoke').textContent = u && u.revoked ? 'Unrevoke' : 'Revoke';
  $('#two-factor-tools').hidden = !(u && u.two_factor);
  $('#reset-tools').hidden = !u;
  $('#qr').hidden = true;
  $('#reset-code').textContent = '';
  (u ? $('#f-tenant') : $('#f-username')).focus();
}

// dataValue parses the data field, showing the problem next to it.
function dataValue() {
  const raw = $('#f-data').value.trim();
  const out = $('#user-form .error[data-for=data]');
  out.textContent = '';
  if (!raw) return undefined;
  try {
    return JSON.parse(raw);
  } catch (err) {
    out.textContent = 'Not valid JSON: ' + err.message;
    throw err;
  }
}
$('#f-data').addEventListener('input', () => { try { dataValue(); } catch (_) { /* shown */ } });

// fieldOf names the form field a server error message is about.
function fieldOf(msg) {
  for (const [word, field] of [['username', 'username'], ['tenant', 'tenant_name'], ['password', 'password'],
    ['email', 'email'], ['scope', 'scopes'], ['data', 'data']]) {
    if (msg.includes(word)) return field;
  }
  return 'form';
}

$('#user-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  clearErrors();
  let data;
  try { data = dataValue(); } catch (_) { $('#f-data').focus(); return; }
  const body = {
    username: $('#f-username').value.trim(),
    tenant_name: $('#f-tenant').value.trim(),
    two_factor: $('#f-two-factor').checked,
    scopes: $('#f-scopes').value.split(/\s+/).filter(Boolean),
  };
  if ($('#f-password').value) body.password = $('#f-password').value;
  if ($('#f-email').value.trim()) body.email = $('#f-email').value.trim();
  if (data !== undefined) body.data = data;
  try {
    const saved = await admin(editing ? '/update_user' : '/create_user', body);
    await loadUsers();
    const u = users.find((x) => x.username === body.username) || saved;
    openUser(u);
    $('#user-form .error[data-for=form]').textContent = '';
  } catch (err) {
    const field = fieldOf(err.message);
    $('#user-form .error[data-for=' + field + ']').textContent = err.message;
    const input = $('#user-form [name=' + field + ']');
    if (input) input.focus();
  }
});

$('#revoke').addEventListener('click', async () => {
  try {
    await admin(editing.revoked ? '/unrevoke_user' : '/revoke_user', { username: editing.username });
    await loadUsers();
    openUser(users.find((x) => x.username === editing.username));
  } catch (err) {
    $('#user-form .error[data-for=form]').textContent = err.message;
  }
});

$('#show-qr').addEventListener('click', async () => {
  try {
    const out = await admin('/create_qr', { username: editing.username, issuer: $('#issuer').value.trim() });
    $('#qr').src = 'data:image/png;base64,' + out.qr;
    $('#qr').hidden = false;
  } catch (err) {
    $('#user-form .error[data-for=form]').textContent = err.message;
  }
});

let countdown = null;
$('#create-code').addEventListener('click', async () => {
  try {
    const out = await admin('/create_totp', { username: editing.username });
    clearInterval(countdown);
    const tick = () => {
      const left = Math.max(0, out.expiry - Math.floor(Date.now() / 1000));
      $('#reset-code').textContent = left > 0
        ? `${out.totp} — valid ${Math.floor(left / 60)}:${String(left % 60).padStart(2, '0')} more`
        : `${out.totp} — expired`;
      if (left === 0) clearInterval(countdown);
    };
    tick();
    countdown = setInterval(tick, 1000);
  } catch (err) {
    $('#user-form .error[data-for=form]').textContent = err.message;
  }
});

// ---- events ----

let watch = null; // { jwt, controller, lastId }

$('#watch-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('#watch-error').textContent = '';
  const body = { username: $('#w-username').value.trim(), password: $('#w-password').value };
  if ($('#w-totp').value.trim()) body.totp = $('#w-totp').value.trim();
  try {
    const { jwt } = await api('/login', body);
    stopWatching();
    $('#w-password').value = '';
    $('#w-totp').value = '';
    $('#event-table tbody').replaceChildren();
    watch = { jwt, controller: null, lastId: null, user: body.username };
    $('#live').hidden = false;
    $('#watch-form').hidden = true;
    stream(watch);
    $('#i-event').focus();
  } catch (err) {
    $('#watch-error').textContent = err.message;
  }
});

function stopWatching() {
  if (watch && watch.controller) watch.controller.abort();
  watch = null;
  $('#live').hidden = true;
  $('#watch-form').hidden = false;
}
$('#stop-watch').addEventListener('click', stopWatching);

// stream reads the event stream with fetch (EventSource cannot send a JWT), reconnecting
// from the last ID it saw when the stream ends.
async function stream(w) {
  w.controller = new AbortController();
  const headers = { Authorization: 'Bearer ' + w.jwt };
  if (w.lastId) headers['Last-Event-ID'] = w.lastId;
  $('#stream-status').textContent = `Connecting as ${w.user}…`;
  try {
    const resp = await fetch('/sse', { headers, signal: w.controller.signal });
    if (!resp.ok) {
      const out = await resp.json().catch(() => ({}));
      $('#stream-status').textContent = 'Stream refused: ' + (out.error || resp.status);
      return;
    }
    $('#stream-status').textContent = `Live: events of ${w.user}'s tenant.`;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const frame = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const ev = {};
        for (const line of frame.split('\n')) {
          const i = line.indexOf(':');
          if (i > 0) ev[line.slice(0, i)] = line.slice(i + 1);
        }
        if (ev.event) { w.lastId = ev.id; showEvent(ev); }
      }
    }
  } catch (err) {
    if (err.name === 'AbortError') return;
  }
  if (watch === w) {
    $('#stream-status').textContent = 'Disconnected; reconnecting…';
    setTimeout(() => { if (watch === w) stream(w); }, 2000);
  }
}

// showEvent keeps one row per event name, newest first, updated in place.
function showEvent(ev) {
  const tbody = $('#event-table tbody');
  let tr = [...tbody.rows].find((r) => r.dataset.event === ev.event);
  if (!tr) {
    tr = el('tr', {}, el('td'), el('td'), el('td', { className: 'data' }), el('td'));
    tr.dataset.event = ev.event;
  }
  let data = ev.data;
  try { data = JSON.stringify(JSON.parse(ev.data)); } catch (_) { /* shown as sent */ }
  tr.cells[0].textContent = ev.event;
  tr.cells[1].textContent = ev.id;
  tr.cells[2].textContent = data;
  tr.cells[3].textContent = new Date().toLocaleTimeString();
  tbody.prepend(tr);
  tr.classList.remove('flash');
  void tr.offsetWidth; // restart the highlight
  tr.classList.add('flash');
}

$('#insert-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('#insert-error').textContent = '';
  let data;
  try { data = JSON.parse($('#i-data').value); } catch (err) {
    $('#insert-error').textContent = 'Data is not valid JSON: ' + err.message;
    return;
  }
  try {
    await api('/insert', { event: $('#i-event').value.trim(), data }, { Authorization: 'Bearer ' + watch.jwt });
  } catch (err) {
    $('#insert-error').textContent = err.message;
  }
});

// A reload keeps the session of this tab.
if (token()) loadUsers().then(() => showApp(true)).catch(() => showApp(false));
