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
  signOutUser();
  for (const id of ['#w-tenant', '#u-username', '#i-event', '#i-data']) $(id).value = '';
  for (const id of ['#watch-error', '#insert-error']) $(id).textContent = '';
  $('#event-table tbody').replaceChildren();
  $('#as-user').open = false;
  showApp(false);
  $('#admin-token').focus();
});

for (const b of document.querySelectorAll('#tabs [data-tab]')) {
  b.addEventListener('click', () => {
    showTab(b.dataset.tab);
    if (b.dataset.tab === 'events') openEvents();
  });
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

// The Events tab watches a tenant's stream with the admin token (GET /sse?tenant=NAME,
// the token in the Authorization header only, never in the URL). Inserting is a user's
// act, into the user's tenant: the "Insert events as a user" box signs in as one.

let watch = null; // { tenant, controller, lastId }
let asUser = null; // { jwt, username, tenant }: a user's JWT, in this page's memory only

// loadTenants fills the tenant field's suggestions with every tenant that has users.
async function loadTenants() {
  const all = await admin('/list_users');
  const tenants = [...new Set(all.map((u) => u.tenant_name))].sort((a, b) => a.localeCompare(b));
  $('#tenant-list').replaceChildren(...tenants.map((t) => el('option', { value: t })));
}

function openEvents() {
  loadTenants().catch((err) => { $('#watch-error').textContent = err.message; });
  const f = $('#w-tenant');
  if (!watch && !f.value) f.value = $('#filter-tenant').value.trim();
  f.focus();
}

$('#watch-form').addEventListener('submit', (e) => {
  e.preventDefault();
  $('#watch-error').textContent = '';
  const tenant = $('#w-tenant').value.trim();
  if (!tenant) return;
  stopWatching();
  $('#event-table tbody').replaceChildren();
  watch = { tenant, controller: null, lastId: null };
  $('#live').hidden = false;
  $('#stop-watch').hidden = false;
  showAsUser();
  stream(watch);
});

function stopWatching() {
  if (watch && watch.controller) watch.controller.abort();
  watch = null;
  $('#live').hidden = true;
  $('#stop-watch').hidden = true;
  showAsUser();
}
$('#stop-watch').addEventListener('click', () => { stopWatching(); $('#w-tenant').focus(); });

const setStatus = (text) => { $('#stream-status').textContent = text; };

// stream reads the tenant's event stream with fetch (EventSource cannot send the admin
// token in a header), reconnecting from the last ID it saw when the stream ends.
async function stream(w) {
  w.controller = new AbortController();
  const headers = { Authorization: 'Bearer ' + token() };
  if (w.lastId) headers['Last-Event-ID'] = w.lastId;
  let retry = 2;
  setStatus(`Connecting to tenant ${w.tenant}…`);
  try {
    const resp = await fetch('/sse?tenant=' + encodeURIComponent(w.tenant), { headers, signal: w.controller.signal });
    if (!resp.ok) {
      const out = await resp.json().catch(() => ({}));
      if (resp.status !== 429 && resp.status !== 503) {
        setStatus('Stream refused: ' + (out.error || resp.status) + (resp.status === 401 ? '. Sign out and in again.' : ''));
        return;
      }
      retry = Math.max(1, Number(resp.headers.get('Retry-After')) || retry);
      throw new Error(out.error || 'busy');
    }
    setStatus(`Live: events of tenant ${w.tenant}.`);
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
        for (const line of frame.split('\n')) { // a keep-alive ":" line has no field name
          const i = line.indexOf(':');
          if (i > 0) ev[line.slice(0, i)] = line.slice(i + 1);
        }
        if (ev.event && watch === w) { w.lastId = ev.id; showEvent(ev); }
      }
    }
  } catch (err) {
    if (err.name === 'AbortError') return;
  }
  if (watch === w) {
    setStatus(`Disconnected from tenant ${w.tenant}; reconnecting…`);
    setTimeout(() => { if (watch === w) stream(w); }, retry * 1000);
  }
}

// Data longer than this is shown cut to its beginning, with the whole a click away.
const SHORT = 200;

// dataCell fills td with the event's data, as text only: event data comes from users.
function dataCell(td, data) {
  if (data.length <= SHORT) {
    td.textContent = data;
    return;
  }
  const wasOpen = !!td.querySelector('details[open]');
  let head = data.slice(0, SHORT);
  if (/[\uD800-\uDBFF]$/.test(head)) head = head.slice(0, -1); // no half of a surrogate pair
  const details = el('details', { className: 'long', open: wasOpen },
    el('summary', {}, el('span', { className: 'size' }, `${data.length.toLocaleString()} characters`), ' ', head + '…'),
    el('pre', { className: 'full', tabIndex: 0 }, data));
  td.replaceChildren(details);
}

// showEvent keeps one row per event name, newest first, updated in place.
function showEvent(ev) {
  const tbody = $('#event-table tbody');
  let tr = [...tbody.rows].find((r) => r.dataset.event === ev.event);
  if (!tr) {
    tr = el('tr', {}, el('td', { className: 'name' }), el('td', { className: 'id' }),
      el('td', { className: 'data' }), el('td', { className: 'received' }));
    tr.dataset.event = ev.event;
  }
  let data = ev.data;
  try { data = JSON.stringify(JSON.parse(ev.data)); } catch (_) { /* shown as sent */ }
  tr.cells[0].textContent = ev.event;
  tr.cells[1].textContent = ev.id;
  dataCell(tr.cells[2], data);
  tr.cells[3].textContent = new Date().toLocaleTimeString();
  tbody.prepend(tr);
  tr.classList.remove('flash');
  void tr.offsetWidth; // restart the highlight
  tr.classList.add('flash');
}

// ---- inserting as a user ----

// claims reads a JWT's payload (for display only: the server checks the token).
function claims(jwt) {
  try {
    const b64 = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
  } catch (_) {
    return {};
  }
}

function showAsUser() {
  $('#as-user-form').hidden = !!asUser;
  $('#as-user-on').hidden = !asUser;
  if (!asUser) return;
  $('#as-user-status').textContent = `Inserting as ${asUser.username}, into tenant ${asUser.tenant}.`;
  $('#as-user-warning').textContent = watch && watch.tenant !== asUser.tenant
    ? `You are watching tenant ${watch.tenant}: events of ${asUser.username} go to tenant ${asUser.tenant}.`
    : '';
}

function signOutUser() {
  asUser = null;
  $('#u-password').value = '';
  $('#u-totp').value = '';
  showAsUser();
}

$('#as-user-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('#insert-error').textContent = '';
  const body = { username: $('#u-username').value.trim(), password: $('#u-password').value };
  if ($('#u-totp').value.trim()) body.totp = $('#u-totp').value.trim();
  try {
    const { jwt } = await api('/login', body);
    asUser = { jwt, username: body.username, tenant: claims(jwt).tenant || '?' };
    $('#u-password').value = '';
    $('#u-totp').value = '';
    showAsUser();
    $('#i-event').focus();
  } catch (err) {
    $('#insert-error').textContent = err.message;
  }
});

$('#as-user-off').addEventListener('click', () => { signOutUser(); $('#u-username').focus(); });

$('#insert-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('#insert-error').textContent = '';
  let data;
  try { data = JSON.parse($('#i-data').value); } catch (err) {
    $('#insert-error').textContent = 'Data is not valid JSON: ' + err.message;
    return;
  }
  try {
    await api('/insert', { event: $('#i-event').value.trim(), data }, { Authorization: 'Bearer ' + asUser.jwt });
  } catch (err) {
    if (err.status === 401) signOutUser(); // expired, revoked, new password: sign in again
    $('#insert-error').textContent = err.message;
  }
});

// A reload keeps the session of this tab.
if (token()) loadUsers().then(() => showApp(true)).catch(() => showApp(false));
