// roomcast chat page (wire protocol v1). Sign in with a dev token, join a room, read history, send
// with pending -> acknowledged state, and survive dropped connections: reconnect with jittered
// exponential back-off, re-join with the last cursor (the server replays what was missed), resend
// un-acked sends under the same client_msg_id. Messages are deduplicated by id. User text is only
// ever set through textContent. Presence, typing and read state: the room's online list (joined
// with presence, then its presence events), "alice is typing…", unread badges per room (asked
// every few seconds, cleared as the room is read: the page sends `read` for the newest message it
// shows), and read receipts under the last message (the server sends them only in small rooms).
// Edits and deletes: one's own messages have Edit (the composer then edits it; Esc cancels) and
// Delete; `edit` frames replace a body and mark it "edited", `delete` frames leave a tombstone
// (for good: a later edit of it changes nothing); history and replays show messages as they are now.

import { Close } from "./protocol.js"; // the server's close codes (generated from gateway/protocol.py)

const $ = (id) => document.getElementById(id);
const scroller = $("scroller"), list = $("messages"), olderBtn = $("older"), input = $("text");
const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const CLOSES = {
  [Close.BAD_TOKEN]: "The server refused the sign-in (bad or expired token)",
  [Close.TOO_LARGE]: "A message was too large for the server",
  [Close.DRAINING]: "The server is restarting (draining); reconnecting",
  [Close.TRY_AGAIN_LATER]: "Too many connections for this user (close another tab); retrying",
  [Close.TOO_SLOW]: "The connection fell behind the room; reconnecting",
};
const BACKOFF_BASE_MS = 500, BACKOFF_MAX_MS = 10000, PING_EVERY_MS = 25000, PONG_WITHIN_MS = 10000;
const TYPING_EVERY_MS = 3000, TYPING_SHOWN_MS = 5000, UNREAD_EVERY_MS = 5000, READ_AFTER_MS = 300;

const st = {
  user: "", token: "", room: "", ws: null, wantOpen: false, joined: false, joining: false,
  cursor: "", next: undefined, loading: "", attempt: 0, timer: 0, pingTimer: 0, pongDue: 0,
  authRetried: false, joinFailures: 0, refill: false,
  ids: new Map(), pending: new Map(), // message id -> <li>; client_msg_id -> {li, frame, retry}
  rooms: new Map(), // room -> {count, more}: the unread badges
  online: new Set(), typing: new Map(), receipts: new Map(), // this room: users; user -> timer; user -> offset
  readSent: -1, readTimer: 0, typedAt: 0, unreadTimer: 0,
  editing: null, changes: new Map(), // the message being edited {id, li}; client_msg_id -> edit/delete frame
};
// Counters for tests and the curious (window.roomcast in the console).
const stats = { reconnects: 0, duplicates: 0, resumeFallbacks: 0, errors: 0 };
window.roomcast = { st, stats };

const NODE = nodeUrl(new URLSearchParams(location.search).get("node"));
$("node").textContent = NODE;

function nodeUrl(param) {
  const own = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
  if (!param) return own;
  try {
    const u = new URL(param);
    if (u.protocol === "ws:" || u.protocol === "wss:") return `${u.protocol}//${u.host}`;
  } catch { /* reported below */ }
  queueMicrotask(() => banner(`Ignoring ?node=${param}: expected ws://host:port or wss://host:port.`));
  return own;
}

// --- small DOM helpers
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function banner(text, kind = "error") {
  $("banner-text").textContent = text;
  $("banner").dataset.kind = kind;
  $("banner").hidden = false;
}
function hideBanner(kind) {
  if (!kind || $("banner").dataset.kind === kind) $("banner").hidden = true;
}
$("banner-close").onclick = () => hideBanner();
function announce(text) { $("announce").textContent = text; }
function setConn(state, detail = state) {
  $("conn").dataset.state = state;
  $("conn").textContent = detail;
}
function offsetOf(cursor) {
  const i = typeof cursor === "string" ? cursor.indexOf("-") : -1;
  const n = i < 0 ? NaN : Number(cursor.slice(i + 1));
  return Number.isFinite(n) ? n : NaN;
}
function newId() {
  const b = crypto.getRandomValues(new Uint8Array(16)); // also in insecure (plain http) contexts
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

// --- messages in the list: ordered by cursor offset (one room = one partition); pending ones last
function render(user, body, ts) {
  const li = el("li", "msg");
  const when = el("time", "when", timeFmt.format(new Date(ts)));
  when.dateTime = new Date(ts).toISOString();
  const meta = el("div", "meta");
  meta.append(el("span", "who", user), when, el("span", "edited"), el("span", "state"));
  if (user === st.user) {
    li.classList.add("mine");
    const edit = el("button", "act edit", "Edit"), del = el("button", "act delete", "Delete");
    edit.type = del.type = "button";
    edit.onclick = () => startEdit(li);
    del.onclick = () => { if (li.dataset.id && confirm("Delete this message?")) change({ type: "delete", id: li.dataset.id }); };
    meta.append(edit, del);
  }
  li.append(meta, el("p", "body", body));
  return li;
}
function markEdited(li, ts) {
  const mark = li.querySelector(".edited");
  mark.textContent = "(edited)";
  mark.title = `Edited ${timeFmt.format(new Date(ts))}`;
  li.dataset.edited = "1";
}
function tombstone(li) { // nothing of the body or the author is kept
  li.dataset.deleted = "1";
  li.classList.remove("mine");
  li.querySelector(".who").textContent = "";
  li.querySelector(".edited").textContent = "";
  for (const b of li.querySelectorAll(".act")) b.remove();
  li.querySelector(".body").textContent = "This message was deleted.";
  if (st.editing?.li === li) stopEdit();
}
function setState(li, state, text) {
  li.dataset.state = state;
  li.querySelector(".state").textContent = text;
}
function place(li, off) {
  li.remove();
  li.dataset.off = String(off);
  const items = list.children;
  let lo = 0, hi = items.length;
  while (hi > 0 && items[hi - 1].dataset.off === undefined) hi--;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (Number(items[mid].dataset.off) <= off) lo = mid + 1; else hi = mid;
  }
  list.insertBefore(li, items[lo] ?? null);
}
function nearBottom() { return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80; }
function toBottom() { scroller.scrollTop = scroller.scrollHeight; }

function advanceCursor(cursor) {
  const off = offsetOf(cursor);
  if (!Number.isNaN(off) && !(offsetOf(st.cursor) >= off)) st.cursor = cursor;
}

/** Adds a message frame or history item; false when it is already shown (same id). */
function addMessage(m) {
  if (st.ids.has(m.id)) { stats.duplicates++; return false; }
  const mine = m.user === st.user && m.cmid ? st.pending.get(m.cmid) : undefined;
  const li = mine ? mine.li : render(m.user, m.body, m.ts);
  if (m.deleted) tombstone(li);
  else if (m.edited_ts) markEdited(li, m.edited_ts);
  li.dataset.id = m.id;
  li.dataset.cursor = m.cursor;
  st.ids.set(m.id, li);
  place(li, offsetOf(m.cursor));
  return true;
}

// --- the connection
function connect() {
  clearTimeout(st.timer);
  if (!st.wantOpen || st.ws) return;
  setConn("connecting", st.attempt ? "reconnecting…" : "connecting…");
  // The token rides in Sec-WebSocket-Protocol (the server selects roomcast.v1 and never echoes
  // the bearer value), not in the URL, which proxies write to their access logs.
  const ws = new WebSocket(`${NODE}/ws?v=1`, ["roomcast.v1", `bearer.${st.token}`]);
  st.ws = ws;
  ws.onopen = () => {
    if (ws !== st.ws) return;
    setConn("online", "connected");
    ping();
    if (st.room) join();
  };
  ws.onmessage = (e) => { if (ws === st.ws) onFrame(JSON.parse(e.data)); };
  ws.onclose = (e) => { if (ws === st.ws) dropped(e.code, e.reason); };
}

function send(frame) {
  if (st.ws && st.ws.readyState === WebSocket.OPEN) st.ws.send(JSON.stringify(frame));
}

function dropped(code, reason) {
  const ws = st.ws;
  st.ws = null;
  st.joined = st.joining = false;
  st.loading = "";
  clearTimeout(st.pingTimer);
  clearTimeout(st.timer);
  if (ws && ws.readyState < WebSocket.CLOSING) ws.close();
  composer();
  updateOlder();
  if (!st.wantOpen) return setConn("offline");
  if (code === Close.BAD_TOKEN) {
    if (st.authRetried) return signedOut(`${CLOSES[Close.BAD_TOKEN]}: ${reason || "no reason given"}. Sign in again.`);
    st.authRetried = true; // one fresh token, then give up
    return fetchToken(st.user).then((t) => { st.token = t; connect(); }, (err) => signedOut(err.message));
  }
  const soon = code === Close.DRAINING || code === Close.TOO_SLOW; // the server asks us to come back: no growing back-off
  const text = CLOSES[code] ?? "The connection was lost; reconnecting";
  banner(`${text} (close code ${code}${reason ? `: ${reason}` : ""}).`, "warn"); // hidden once re-joined
  const cap = soon && st.attempt === 0 ? 300 : Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** st.attempt);
  const delay = cap / 2 + Math.random() * cap / 2; // jitter, never a tight loop
  st.attempt++;
  stats.reconnects++;
  setConn("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
  st.timer = setTimeout(connect, delay);
}

function signedOut(text) { // the room and its messages stay: signing in again resumes from the cursor
  st.wantOpen = false;
  setConn("offline");
  composer();
  banner(text);
  $("signin").hidden = false;
  $("name").focus();
}

function ping() {
  clearTimeout(st.pingTimer);
  st.pingTimer = setTimeout(() => {
    if (!st.ws) return;
    st.pongDue = Date.now() + PONG_WITHIN_MS;
    send({ type: "ping" });
    st.pingTimer = setTimeout(() => { if (st.pongDue) dropped(4000, "no pong from the server"); }, PONG_WITHIN_MS);
  }, PING_EVERY_MS);
}

function join() {
  if (!st.ws || st.ws.readyState !== WebSocket.OPEN || !st.room) return;
  const frame = { type: "join", room: st.room, presence: true };
  if (st.cursor) frame.cursor = st.cursor;
  st.joining = true;
  send(frame);
}

// --- frames from the server
function onFrame(f) {
  switch (f.type) {
    case "joined": return onJoined(f);
    case "message": return onMessage(f);
    case "edit": return onEdit(f);
    case "delete": return onDelete(f);
    case "ack": return onAck(f);
    case "history": return onHistory(f);
    case "error": return onError(f);
    case "pong": st.pongDue = 0; return ping();
    case "presence": return onPresence(f);
    case "presence_event": return onPresenceEvent(f);
    case "typing": return onTyping(f);
    case "read": return onRead(f);
    case "unread": return onUnread(f);
  }
}

// --- presence, typing, read state
function renderOnline(count) {
  const users = [...st.online].sort();
  $("online").replaceChildren(...users.map((u) => el("li", u === st.user ? "me" : "", u)));
  $("online-count").textContent = `(${count ?? users.length})`;
}
function onPresence(f) {
  if (f.room !== st.room) return;
  st.online = new Set(f.users);
  renderOnline(f.count);
}
function onPresenceEvent(f) {
  if (f.room !== st.room) return;
  if (f.state === "online") st.online.add(f.user); else st.online.delete(f.user);
  renderOnline();
}
function renderTyping() {
  const who = [...st.typing.keys()];
  $("typing").textContent = who.length === 0 ? "" : who.length === 1 ? `${who[0]} is typing…`
    : `${who.slice(0, -1).join(", ")} and ${who[who.length - 1]} are typing…`;
}
function stopTyping(user) {
  clearTimeout(st.typing.get(user));
  if (st.typing.delete(user)) renderTyping();
}
function onTyping(f) {
  if (f.room !== st.room || f.user === st.user) return;
  clearTimeout(st.typing.get(f.user));
  st.typing.set(f.user, setTimeout(() => stopTyping(f.user), TYPING_SHOWN_MS));
  renderTyping();
}
function lastShown() { // the newest message shown with a cursor: [offset, cursor]
  for (let li = list.lastElementChild; li; li = li.previousElementSibling) {
    if (li.dataset.cursor) return [Number(li.dataset.off), li.dataset.cursor];
  }
  return [-1, ""];
}
function renderReceipts() {
  const [last] = lastShown();
  const seen = [...st.receipts].filter(([u, off]) => u !== st.user && off >= last && last >= 0).map(([u]) => u).sort();
  $("receipts").hidden = seen.length === 0;
  $("receipts").textContent = seen.length ? `Seen by ${seen.join(", ")}` : "";
}
function onRead(f) {
  if (f.user === st.user) { // our mark (the answer, or another device): the room is read up to it
    const r = st.rooms.get(f.room);
    if (r && f.room === st.room) { r.count = 0; r.more = false; }
    if (f.room === st.room) st.readSent = Math.max(st.readSent, offsetOf(f.cursor));
    renderRooms();
    return askUnread(1000); // counts after the new mark
  }
  if (f.room !== st.room) return;
  st.receipts.set(f.user, Math.max(st.receipts.get(f.user) ?? -1, offsetOf(f.cursor)));
  renderReceipts();
}
function markRead() { // the room on screen is read up to its newest message (soon: one frame per burst)
  clearTimeout(st.readTimer);
  st.readTimer = setTimeout(flushRead, READ_AFTER_MS);
}
function flushRead() {
  clearTimeout(st.readTimer);
  const [off, cursor] = lastShown();
  if (!st.joined || off <= st.readSent || document.visibilityState === "hidden") return;
  st.readSent = off;
  send({ type: "read", room: st.room, cursor });
}
function askUnread(after = 0) {
  clearTimeout(st.unreadTimer);
  st.unreadTimer = setTimeout(() => {
    if (st.ws && st.ws.readyState === WebSocket.OPEN) send({ type: "unread" });
    askUnread(UNREAD_EVERY_MS);
  }, after);
}
function onUnread(f) {
  for (const r of f.rooms) st.rooms.set(r.room, { count: r.room === st.room && st.joined ? 0 : r.count, more: r.more });
  renderRooms();
}
function renderRooms() {
  if (st.room && !st.rooms.has(st.room)) st.rooms.set(st.room, { count: 0, more: false });
  const items = [...st.rooms.keys()].sort().map((room) => {
    const { count, more } = st.rooms.get(room);
    const li = el("li");
    li.dataset.room = room;
    li.setAttribute("aria-current", String(room === st.room));
    const b = el("button", "", "");
    b.type = "button";
    b.append(el("span", "name", `#${room}`));
    if (count > 0) {
      const badge = el("span", "badge", more ? `${count}+` : String(count));
      badge.setAttribute("aria-label", `${count}${more ? " or more" : ""} unread`);
      b.append(badge);
    }
    b.onclick = () => { $("room").value = room; $("roomform").requestSubmit(); };
    li.append(b);
    return li;
  });
  $("rooms").replaceChildren(...items);
}
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") markRead(); });

function onJoined(f) {
  if (f.room !== st.room) return send({ type: "leave", room: f.room }); // switched rooms meanwhile
  const resumed = Boolean(st.cursor);
  st.joining = false;
  st.joined = true;
  st.attempt = st.joinFailures = 0;
  st.authRetried = false;
  if (!resumed) st.cursor = f.cursor; // when resuming, only replayed messages move the cursor
  hideBanner("warn");
  if (resumed && f.recovered === false) {
    banner("Some messages could not be recovered after the reconnect; showing the newest ones.", "warn");
    st.refill = true;
  }
  if (st.next === undefined || st.refill) requestHistory(null);
  for (const p of st.pending.values()) send(p.frame); // same client_msg_id: never stored twice
  for (const frame of st.changes.values()) send(frame);
  composer();
  send({ type: "presence", room: st.room }); // then its presence events keep the list
  st.rooms.set(st.room, { count: 0, more: false }); // on screen: read as it shows
  renderRooms();
  askUnread(0);
  markRead();
}

function onMessage(f) {
  if (f.room !== st.room) return;
  advanceCursor(f.cursor);
  const follow = nearBottom() || (f.user === st.user && st.pending.has(f.cmid));
  if (addMessage(f)) {
    if (follow) toBottom();
    if (f.user !== st.user && !f.deleted) announce(`${f.user}: ${f.body}`);
    stopTyping(f.user);
    renderReceipts();
    markRead();
  }
}

function onEdit(f) {
  if (f.room !== st.room) return;
  advanceCursor(f.cursor);
  const li = st.ids.get(f.id);
  if (!li || li.dataset.deleted) return; // older than what is shown, or deleted: a delete is final
  li.querySelector(".body").textContent = f.body;
  markEdited(li, f.edited_ts);
}

function onDelete(f) {
  if (f.room !== st.room) return;
  advanceCursor(f.cursor);
  const li = st.ids.get(f.id);
  if (li) tombstone(li);
}

// --- editing and deleting one's own messages: sent like sends (kept until acked, resent on re-join)
function change(fields) {
  const cmid = newId();
  const frame = { ...fields, room: st.room, client_msg_id: cmid };
  st.changes.set(cmid, frame);
  if (st.joined) send(frame);
}
function startEdit(li) {
  if (!li.dataset.id || li.dataset.deleted) return;
  st.editing = { id: li.dataset.id, li };
  li.dataset.editing = "1";
  input.value = li.querySelector(".body").textContent;
  composer();
  input.focus();
}
function stopEdit() {
  if (st.editing) delete st.editing.li.dataset.editing;
  st.editing = null;
  input.value = "";
  composer();
}

function onAck(f) {
  if (st.changes.delete(f.client_msg_id)) return; // an edit or delete: its frame shows the change
  const p = st.pending.get(f.client_msg_id);
  if (!p) return;
  st.pending.delete(f.client_msg_id);
  clearTimeout(p.retry);
  setState(p.li, "acked", "✓ sent");
  p.li.title = "Acknowledged by the server";
  if (!st.ids.has(f.id)) {
    p.li.dataset.id = f.id;
    p.li.dataset.cursor = f.cursor;
    st.ids.set(f.id, p.li);
    place(p.li, offsetOf(f.cursor));
  }
}

function requestHistory(before) {
  if (!st.joined || st.loading) return;
  st.loading = before ? "older" : "newest";
  send(before ? { type: "history", room: st.room, before, limit: 50 } : { type: "history", room: st.room, limit: 50 });
  updateOlder();
}

function onHistory(f) {
  if (f.room !== st.room) return;
  const older = st.loading === "older", height = scroller.scrollHeight, top = scroller.scrollTop;
  st.loading = "";
  let added = 0;
  for (const m of f.messages) if (addMessage(m)) added++;
  if (older) {
    scroller.scrollTop = top + (scroller.scrollHeight - height); // keep the reader where they were
    st.next = f.next;
    announce(added ? `${added} older messages loaded` : "No older messages");
  } else {
    if (st.next === undefined) st.next = f.next;
    st.refill = false;
    toBottom();
    markRead();
  }
  updateOlder();
}

function onError(f) {
  stats.errors++;
  const p = f.ref ? st.pending.get(f.ref) : undefined;
  banner(`Server error ${f.code}: ${f.reason}`, p && f.code === "rate_limited" ? "warn" : "error");
  const changed = f.ref ? st.changes.get(f.ref) : undefined;
  if (changed) { // an edit or delete: tried again when the server could not take it now, else dropped
    if (f.code === "rate_limited" || f.code === "unavailable") {
      setTimeout(() => { if (st.joined && st.changes.has(f.ref)) send(changed); }, (f.retry_after_ms ?? 1000) + Math.random() * 250);
    } else st.changes.delete(f.ref);
  } else if (p) {
    if (f.code === "rate_limited" || f.code === "unavailable") {
      clearTimeout(p.retry);
      p.retry = setTimeout(() => { if (st.joined) send(p.frame); }, (f.retry_after_ms ?? 1000) + Math.random() * 250);
    } else {
      st.pending.delete(f.ref);
      setState(p.li, "failed", `✗ not sent: ${f.reason}`);
    }
  } else if (st.joining) {
    joinFailed(f);
  } else if (st.loading) {
    st.loading = "";
    updateOlder();
  }
}

function joinFailed(f) {
  st.joining = false;
  st.joinFailures++;
  if (st.cursor && (f.code === "bad_cursor" || st.joinFailures > 3)) {
    // Cannot resume: join live from now and fill in with the newest history page.
    stats.resumeFallbacks++;
    st.cursor = "";
    st.refill = true;
    banner(`Could not resume the room (${f.code}: ${f.reason}); some messages may be missing.`, "warn");
    return join();
  }
  if (f.code === "unavailable" || st.cursor) {
    st.timer = setTimeout(join, Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** st.joinFailures) * (0.5 + Math.random() / 2));
  }
}

// --- the forms
function composer() { // usable while reconnecting too: sends wait as pending and go out once re-joined
  input.disabled = $("send").disabled = !st.room || !st.wantOpen;
  input.placeholder = !st.wantOpen ? "Sign in to chat" : st.editing ? "Edit your message (Esc cancels)"
    : st.joined ? `Message #${st.room}`
    : st.room ? "Reconnecting: messages go out once connected" : "Join a room to chat";
}
function updateOlder() {
  olderBtn.hidden = st.next === undefined;
  olderBtn.disabled = !st.next || Boolean(st.loading) || !st.joined;
  olderBtn.textContent = st.loading === "older" ? "Loading…" : st.next === null ? "Start of the room" : "Load older messages";
}
olderBtn.onclick = () => requestHistory(st.next);
scroller.addEventListener("scroll", () => { if (scroller.scrollTop < 40 && st.next) requestHistory(st.next); });

async function fetchToken(user) {
  const r = await fetch(`/dev/token?user=${encodeURIComponent(user)}`, { cache: "no-store" });
  if (r.status === 404) throw new Error("Sign-in by name is off on this server (it needs DEV_MODE=true).");
  const body = await r.json().catch(() => ({}));
  if (!r.ok || !body.token) throw new Error(`Sign-in failed: ${body.reason ?? `HTTP ${r.status}`}`);
  return body.token;
}

$("signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  const user = $("name").value.trim();
  try {
    st.token = await fetchToken(user);
  } catch (err) {
    return banner(String(err.message || err));
  }
  hideBanner();
  Object.assign(st, { user, wantOpen: true, authRetried: false, attempt: 0 });
  $("who").textContent = `signed in as ${user}`;
  $("signin").hidden = true;
  $("chat").hidden = false;
  composer();
  (st.room ? input : $("room")).focus();
  connect();
});

$("roomform").addEventListener("submit", (e) => {
  e.preventDefault();
  const room = $("room").value.trim();
  if (!ROOM_RE.test(room)) return banner("A room name is 1–64 characters of A–Z a–z 0–9 _ . -");
  hideBanner();
  if (room === st.room && (st.joined || st.joining)) return input.focus();
  if (st.room && st.joined) {
    flushRead(); // what was on screen is read
    send({ type: "leave", room: st.room });
  }
  for (const p of st.pending.values()) clearTimeout(p.retry);
  stopEdit();
  st.changes.clear();
  Object.assign(st, { room, joined: false, joining: false, cursor: "", next: undefined, loading: "", joinFailures: 0,
    readSent: -1 });
  st.ids.clear();
  st.pending.clear();
  st.online.clear();
  st.receipts.clear();
  for (const u of [...st.typing.keys()]) stopTyping(u);
  list.replaceChildren();
  renderOnline(0);
  renderReceipts();
  renderRooms();
  composer();
  updateOlder();
  document.title = `#${room} · roomcast`;
  join();
  input.focus();
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const body = input.value;
  if (!body.trim() || !st.room) return;
  if (st.editing) {
    if (body !== st.editing.li.querySelector(".body").textContent) change({ type: "edit", id: st.editing.id, body });
    return stopEdit();
  }
  const cmid = newId();
  const li = render(st.user, body, Date.now());
  li.dataset.cmid = cmid;
  setState(li, "pending", "sending…");
  list.append(li);
  toBottom();
  const p = { li, frame: { type: "send", room: st.room, client_msg_id: cmid, body }, retry: 0 };
  st.pending.set(cmid, p);
  if (st.joined) send(p.frame); // otherwise sent once the room is (re)joined
  input.value = "";
  input.focus();
});

input.addEventListener("keydown", (e) => { if (e.key === "Escape" && st.editing) stopEdit(); });

input.addEventListener("input", () => { // "typing" at most every TYPING_EVERY_MS while keys come
  if (!st.joined || !input.value.trim() || Date.now() - st.typedAt < TYPING_EVERY_MS) return;
  st.typedAt = Date.now();
  send({ type: "typing", room: st.room });
});

window.addEventListener("online", () => { if (st.wantOpen && !st.ws) connect(); });
