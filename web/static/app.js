// The selector page: pick a Letta agent, connect, talk (voice or text), disconnect.
//
// One Room object per connection, always awaited to disconnect before the next one starts. A refresh or a network
// drop rejoins the same room with the resume ticket kept in sessionStorage (the server resumes the session inside
// its reconnect window); Disconnect is a hang-up: the ticket is dropped and the next Connect starts fresh.
// When the room's agent vanishes (its worker crashed or was deployed), the page stays in the room and talks to the
// agent that takes the room over (agentwatch.js decides which one and what to show); a new room is the last resort.
"use strict";

(() => {
  const LK = window.LivekitClient;
  const W = window.SGAgentWatch;
  const $ = (id) => document.getElementById(id);
  const el = {
    agent: $("agent"), agentDesc: $("agent-desc"), connect: $("connect"), disconnect: $("disconnect"),
    offlineNote: $("offline-note"),
    mute: $("mute"), enableAudio: $("enable-audio"), level: $("level"), levelLabel: $("level-label"), note: $("note"),
    statusBox: $("status-box"), status: $("status"), transcript: $("transcript"), empty: $("empty"),
    chat: $("chat"), message: $("message"), send: $("send"), audio: $("audio"),
    dRoom: $("d-room"), dIdentity: $("d-identity"), dAgent: $("d-agent"), dHealth: $("d-health"),
  };

  const KEY_AGENT = "sg.agent";
  const KEY_TICKET = "sg.resume";
  const KEY_TRANSCRIPT = "sg.transcript";
  /** A takeover under way ({room, since, from}): a refresh meanwhile keeps waiting for the same deadline. */
  const KEY_TAKEOVER = "sg.takeover";
  const AGENT_STATE = "lk.agent.state";
  const AGENT_NAME = "lk.agent.name";
  const MAX_ENTRIES = 200;
  /** How long a new room may wait for its first agent before the page tries a new room. LiveKit dispatches an agent
   * once, when the room is created; if no worker takes the job (all busy) the room stays without one. (A room whose
   * agent vanished waits longer for a new one: the token server's `agent_return_wait`, agentwatch.js.) */
  const AGENT_WAIT_MS = 10000;
  const MAX_ROOM_TRIES = 3;
  /** Typed text waits for the greeting to end (at most this long): a message that interrupts the greeting in its
   * first moments was seen to lose its reply (LiveKit Agents 1.8.9; see the report in docs/web.md). */
  const GREETING_WAIT_MS = 8000;
  /** After a takeover, typed text waits this long for the new agent to start a greeting (an adopted session does
   * not greet; a fresh one does). */
  const TAKEOVER_QUIET_MS = 2000;
  /** How long "reconnected" stays in the status line after a takeover. */
  const NOTICE_MS = 6000;

  /** The live connection, or null. */
  let current = null;
  /** The operation in progress (connect or disconnect): the next one waits for it. */
  let pending = Promise.resolve();
  let agents = [];
  /** Typed messages waiting for the agent: text sent before the agent has joined would reach nobody. */
  const outbox = [];

  // --- small helpers -------------------------------------------------------------------------------------------

  function serial(fn) {
    const run = pending.then(fn, fn);
    pending = run.catch(() => {});
    return run;
  }

  function storage(kind) {
    try { return kind === "local" ? window.localStorage : window.sessionStorage; } catch { return null; }
  }

  function readJSON(kind, key) {
    try { return JSON.parse(storage(kind)?.getItem(key) ?? "null"); } catch { return null; }
  }

  function writeJSON(kind, key, value) {
    try {
      if (value === null) storage(kind)?.removeItem(key); else storage(kind)?.setItem(key, JSON.stringify(value));
    } catch { /* storage full or disabled: resuming after a refresh will not work, nothing else breaks */ }
  }

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(path, body) {
    const init = body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    let r;
    try { r = await fetch(path, init); } catch (e) { throw new ApiError(0, "network", "the page's server is unreachable"); }
    let data = null;
    try { data = await r.json(); } catch { /* not JSON */ }
    if (!r.ok) throw new ApiError(r.status, data?.code ?? "error", data?.error ?? `HTTP ${r.status}`);
    return data;
  }

  function mark(name) {
    try { performance.mark(name); } catch { /* old browser */ }
  }

  // --- status line ---------------------------------------------------------------------------------------------

  const STATE_TEXT = {
    idle: "Disconnected",
    connecting: "Connecting…",
    resuming: "Rejoining your conversation…",
    waiting: "Connected · waiting for the agent…",
    initializing: "Agent is starting…",
    listening: "Agent is listening",
    thinking: "Agent is thinking…",
    speaking: "Agent is speaking",
    reconnecting: "Connection lost · reconnecting…",
    "agent-reconnecting": "Agent reconnecting…",
    disconnecting: "Hanging up…",
    ended: "Disconnected",
    error: "Error",
  };

  function setStatus(state, detail) {
    el.statusBox.dataset.state = state;
    el.status.textContent = detail ? `${STATE_TEXT[state]} — ${detail}` : STATE_TEXT[state];
  }

  function refreshStatus(conn) {
    if (conn !== current || !conn.connected) return;
    if (conn.reconnecting) { setStatus("reconnecting"); return; }
    const [state, detail] = W.status(conn.watch, conn.agent?.attributes?.[AGENT_STATE]);
    const notice = conn.watch.phase === "live" && Date.now() < conn.noticeUntil ? "agent reconnected" : undefined;
    setStatus(state, detail ?? notice);
    if (conn.agent && conn.resumed && !conn.markedResumed) { conn.markedResumed = true; mark("sg:resumed"); }
    if (agentReady(conn)) flushOutbox(conn);
  }

  /** The agent is in the room and its session runs (it publishes its state once its AgentSession started), and
   * it has finished greeting a fresh session. */
  function agentReady(conn) {
    const state = conn.agent?.attributes?.[AGENT_STATE];
    if (!state || conn.watch.phase !== "live") return false;
    if (!conn.greeted) {
      if (state === "speaking") conn.heardSpeaking = true;
      else if (conn.heardSpeaking && state !== "initializing") conn.greeted = true;
      if (!conn.greetTimer && !conn.greeted) {
        // At most GREETING_WAIT_MS; after a takeover only TAKEOVER_QUIET_MS unless the new agent started speaking.
        const started = Date.now();
        const check = () => {
          const waited = Date.now() - started;
          if (conn.greeted) return;
          if (waited >= GREETING_WAIT_MS || (!conn.heardSpeaking && waited >= conn.quietMs)) {
            conn.greeted = true;
            refreshStatus(conn);
            return;
          }
          conn.greetTimer = setTimeout(check, Math.min(GREETING_WAIT_MS - waited, 500));
        };
        conn.greetTimer = setTimeout(check, Math.min(conn.quietMs, GREETING_WAIT_MS));
      }
    }
    return conn.greeted;
  }

  async function flushOutbox(conn) {
    if (conn.flushing) return;
    conn.flushing = true;
    try {
      while (outbox.length && conn === current && conn.connected && !conn.reconnecting && agentReady(conn)) {
        const item = outbox[0];
        try {
          await conn.room.localParticipant.sendText(item.text, { topic: "lk.chat" });
        } catch (e) {
          if (conn !== current) return; // sent again on the next connection
          outbox.shift();
          item.li.classList.remove("pending");
          item.li.classList.add("failed");
          note(`Could not send the message: ${e?.message ?? e}`);
          continue;
        }
        outbox.shift();
        item.li.classList.remove("pending");
      }
    } finally {
      conn.flushing = false;
    }
  }

  function failOutbox(why) {
    for (const item of outbox.splice(0)) {
      item.li.classList.remove("pending");
      item.li.classList.add("failed");
      item.li.title = why;
    }
  }

  function note(text) {
    el.note.hidden = !text;
    el.note.textContent = text || "";
  }

  function setControls(phase) {
    // phase: idle | busy | live
    const live = phase === "live";
    el.agent.disabled = phase !== "idle" || agents.length === 0;
    el.connect.disabled = phase !== "idle" || !el.agent.value;
    el.disconnect.disabled = phase === "idle";
    el.mute.disabled = !live;
    el.message.disabled = !live;
    el.send.disabled = !live;
  }

  function showDetails(info) {
    el.dRoom.textContent = info?.room ?? "—";
    el.dIdentity.textContent = info?.identity ?? "—";
    const a = agents.find((x) => x.id === info?.agent);
    el.dAgent.textContent = info ? (a ? `${a.name} (${a.id})` : info.agent) : "—";
  }

  // --- transcript ----------------------------------------------------------------------------------------------

  const entries = new Map(); // key -> {li, data}
  let saveTimer = null;

  function scheduleSave() {
    if (saveTimer) return;
    saveTimer = setTimeout(() => { saveTimer = null; saveTranscript(); }, 250);
  }

  function saveTranscript() {
    if (!readJSON("session", KEY_TICKET)) return;
    const data = [...el.transcript.querySelectorAll("li")].slice(-MAX_ENTRIES).map((li) => ({
      who: li.dataset.who, via: li.dataset.via ?? "", text: li.querySelector(".text")?.textContent ?? li.textContent,
    }));
    writeJSON("session", KEY_TRANSCRIPT, data);
  }

  function addEntry(key, who, via, text) {
    el.empty.hidden = true;
    const li = document.createElement("li");
    li.className = `entry ${who}`;
    li.dataset.who = who;
    if (via) li.dataset.via = via;
    if (who === "divider") {
      li.textContent = text;
      li.setAttribute("role", "separator");
    } else {
      const label = document.createElement("span");
      label.className = "who";
      label.textContent = who === "agent" ? "Agent" : via === "voice" ? "You (voice)" : "You";
      const body = document.createElement("span");
      body.className = "text";
      body.textContent = text;
      li.append(label, body);
    }
    el.transcript.append(li);
    while (el.transcript.children.length > MAX_ENTRIES) el.transcript.firstElementChild.remove();
    if (key) {
      entries.set(key, li);
      if (entries.size > MAX_ENTRIES) entries.delete(entries.keys().next().value);
    }
    el.transcript.scrollTop = el.transcript.scrollHeight;
    scheduleSave();
    return li;
  }

  function setEntryText(li, text, final) {
    const body = li.querySelector(".text");
    if (body.textContent !== text) body.textContent = text;
    li.classList.toggle("interim", !final);
    el.transcript.scrollTop = el.transcript.scrollHeight;
    scheduleSave();
  }

  function divider(text) {
    const last = el.transcript.lastElementChild;
    if (!last) return;
    if (last.dataset.who === "divider") {
      // Nothing was said since the last one: the newer news replaces it ("Rejoined" → "new conversation").
      last.textContent = text;
      scheduleSave();
      return;
    }
    addEntry(null, "divider", "", text);
  }

  function restoreTranscript() {
    const saved = readJSON("session", KEY_TRANSCRIPT);
    if (!Array.isArray(saved)) return;
    for (const e of saved.slice(-MAX_ENTRIES)) {
      if (e && typeof e.text === "string" && ["agent", "user", "divider"].includes(e.who)) {
        addEntry(null, e.who, e.via, e.text);
      }
    }
  }

  function onTranscription(conn, reader, participantInfo) {
    const attrs = reader.info.attributes ?? {};
    const segment = attrs["lk.segment_id"] || reader.info.id;
    const trackId = attrs["lk.transcribed_track_id"] ?? "";
    const local = conn.room.localParticipant;
    const mine = participantInfo?.identity === local.identity || (trackId && local.trackPublications.has(trackId));
    const who = mine ? "user" : "agent";
    const key = `${conn.info.room}/${segment}`;
    (async () => {
      let text = "";
      let li = entries.get(key);
      try {
        for await (const chunk of reader) {
          if (conn !== current) return;
          text += chunk;
          if (!text.trim()) continue;
          if (!li) {
            li = addEntry(key, who, mine ? "voice" : "", text);
            if (who === "agent" && !conn.heardAgent) { conn.heardAgent = true; mark("sg:first-agent-text"); }
          }
          setEntryText(li, text, false);
        }
        // The agent's reply is one stream per segment; the user's speech comes as interim streams, then a final one.
        if (li && conn === current) setEntryText(li, text, who === "agent" || attrs["lk.transcription_final"] === "true");
      } catch (e) {
        // A stream cut by a disconnect: what arrived stays on screen.
        if (conn === current) console.warn("transcription stream ended early:", e?.message ?? e);
      }
    })();
  }

  // --- microphone level ----------------------------------------------------------------------------------------

  function startMeter(conn, track) {
    stopMeter(conn);
    const mst = track?.mediaStreamTrack;
    if (!mst) return;
    try {
      const ctx = new AudioContext();
      const src = ctx.createMediaStreamSource(new MediaStream([mst]));
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 1024;
      src.connect(analyser);
      const buf = new Float32Array(analyser.fftSize);
      const timer = setInterval(() => {
        if (ctx.state === "suspended") { ctx.resume().catch(() => {}); }
        analyser.getFloatTimeDomainData(buf);
        let sum = 0;
        for (const v of buf) sum += v * v;
        const rms = Math.sqrt(sum / buf.length);
        el.level.value = conn.muted ? 0 : Math.min(1, rms * 5);
      }, 100);
      conn.meter = { ctx, timer };
    } catch (e) {
      console.warn("no mic level meter:", e?.message ?? e);
    }
  }

  function stopMeter(conn) {
    if (!conn.meter) return;
    clearInterval(conn.meter.timer);
    conn.meter.ctx.close().catch(() => {});
    conn.meter = null;
    el.level.value = 0;
  }

  // --- resume ticket -------------------------------------------------------------------------------------------

  function saveTicket(info, ttlSeconds) {
    writeJSON("session", KEY_TICKET, {
      resume: info.resume, agent: info.agent, room: info.room, identity: info.identity,
      expiresAt: Date.now() + ttlSeconds * 1000,
    });
  }

  function freshTicket() {
    const t = readJSON("session", KEY_TICKET);
    return t && typeof t.resume === "string" && t.expiresAt > Date.now() + 1000 ? t : null;
  }

  function dropTicket() {
    writeJSON("session", KEY_TICKET, null);
    writeJSON("session", KEY_TRANSCRIPT, null);
    writeJSON("session", KEY_TAKEOVER, null);
  }

  /** The takeover saved for `room` by an earlier page of this tab (a refresh while "Agent reconnecting…"). */
  function savedTakeover(room) {
    const t = readJSON("session", KEY_TAKEOVER);
    return t && t.room === room && Number.isFinite(t.since) ? t : null;
  }

  function startRenewal(conn) {
    const every = Math.max(5, Math.min(20, (conn.info.resume_expires_in ?? 30) / 3)) * 1000;
    conn.renewTimer = setInterval(async () => {
      if (conn !== current) return;
      try {
        const r = await api("/api/ticket", { resume: conn.info.resume });
        if (conn !== current) return;
        conn.info.resume = r.resume;
        saveTicket(conn.info, r.resume_expires_in);
      } catch (e) {
        if (e.status === 403) { clearInterval(conn.renewTimer); }
        console.warn("could not renew the resume ticket:", e.message);
      }
    }, every);
  }

  // --- connection ----------------------------------------------------------------------------------------------

  function isAgent(p) {
    return p?.kind === LK.ParticipantKind.AGENT;
  }

  function wire(conn) {
    const { room } = conn;
    const E = LK.RoomEvent;
    room.registerTextStreamHandler("lk.transcription", (reader, info) => onTranscription(conn, reader, info));
    room
      .on(E.ParticipantConnected, (p) => { if (isAgent(p)) updateAgent(conn); })
      .on(E.ParticipantDisconnected, (p) => { if (isAgent(p)) updateAgent(conn, p); })
      .on(E.ParticipantAttributesChanged, (changed, p) => { if (isAgent(p)) updateAgent(conn); })
      .on(E.Reconnecting, () => { conn.reconnecting = true; refreshStatus(conn); })
      .on(E.SignalReconnecting, () => { conn.reconnecting = true; refreshStatus(conn); })
      .on(E.Reconnected, () => { conn.reconnecting = false; updateAgent(conn); })
      .on(E.TrackSubscribed, (track, pub, participant) => {
        // Every agent's audio plays: after a takeover the new agent's track arrives here like the first one's.
        if (track.kind !== LK.Track.Kind.Audio) return;
        const audio = track.attach();
        audio.dataset.participant = participant?.identity ?? "";
        el.audio.append(audio);
      })
      .on(E.TrackUnsubscribed, (track) => { track.detach().forEach((a) => a.remove()); })
      .on(E.AudioPlaybackStatusChanged, () => { el.enableAudio.hidden = room.canPlaybackAudio; })
      .on(E.MediaDevicesError, (e) => { note(`Microphone problem: ${e?.message ?? e}. You can still type.`); })
      .on(E.Disconnected, (reason) => { onDisconnected(conn, reason); });
  }

  /** The room's agent participants as agentwatch.js records (`gone`: one being removed, left out). */
  function agentRecords(conn, gone) {
    const list = [];
    for (const p of conn.room.remoteParticipants.values()) {
      if (!isAgent(p) || p.identity === gone?.identity) continue;
      if (!conn.seen.has(p.identity)) conn.seen.set(p.identity, ++conn.seq);
      list.push({
        identity: p.identity, name: p.attributes?.[AGENT_NAME] ?? "", joinedAt: p.joinedAt?.getTime() ?? 0,
        seq: conn.seen.get(p.identity), state: p.attributes?.[AGENT_STATE] ?? "",
      });
    }
    return list;
  }

  /** Something about the room's agents changed (or may have): pick the agent to talk to, show it, arm the timer. */
  function updateAgent(conn, gone) {
    if (conn !== current || !conn.connected) return;
    if (gone) conn.seen.delete(gone.identity);
    const prev = conn.watch;
    const next = W.track(prev, { agents: agentRecords(conn, gone), agentName: conn.info.agent_name, now: Date.now() });
    conn.watch = next;
    conn.agent = next.agent === null ? null : conn.room.remoteParticipants.get(next.agent) ?? null;
    if (next.phase !== prev.phase || next.agent !== prev.agent) {
      console.info(`agent ${prev.agent ?? "-"} (${prev.phase}) → ${next.agent ?? "-"} (${next.phase}) in ${conn.info.room}`);
    }
    if (prev.hadAgent && next.agent !== null && next.agent !== prev.agent) {
      // Another agent: its session may greet first (a fresh one) or not (one adopted from saved state).
      conn.greeted = false;
      conn.heardSpeaking = false;
      clearTimeout(conn.greetTimer);
      conn.greetTimer = null;
      conn.quietMs = TAKEOVER_QUIET_MS;
    }
    if (next.reconnected) {
      mark("sg:agent-reconnected");
      divider("Agent reconnected");
      conn.noticeUntil = Date.now() + NOTICE_MS;
      clearTimeout(conn.noticeTimer);
      conn.noticeTimer = setTimeout(() => refreshStatus(conn), NOTICE_MS + 50);
    }
    if (next.phase === "takeover" && prev.phase !== "takeover") mark("sg:agent-lost");
    writeJSON("session", KEY_TAKEOVER, next.phase === "takeover" && next.since !== null
      ? { room: conn.info.room, since: next.since, from: next.from } : null);
    armAgentTimer(conn);
    refreshStatus(conn);
  }

  function armAgentTimer(conn) {
    clearTimeout(conn.agentTimer);
    const at = W.deadline(conn.watch, {
      connectedAt: conn.connectedAt, firstWaitMs: AGENT_WAIT_MS, returnWaitMs: conn.returnWaitMs,
    });
    if (at !== null) conn.agentTimer = setTimeout(() => noAgent(conn), Math.max(0, at - Date.now()));
  }

  function release(conn) {
    clearTimeout(conn.agentTimer);
    clearTimeout(conn.greetTimer);
    clearTimeout(conn.noticeTimer);
    clearInterval(conn.renewTimer);
    clearTimeout(conn.retryTimer);
    stopMeter(conn);
    conn.room.unregisterTextStreamHandler("lk.transcription");
    conn.room.removeAllListeners();
    el.audio.replaceChildren();
    el.enableAudio.hidden = true;
    el.mute.setAttribute("aria-pressed", "false");
    el.mute.textContent = "Mute mic";
    el.levelLabel.textContent = "Mic";
  }

  const R = () => LK.DisconnectReason;

  function onDisconnected(conn, reason) {
    if (conn.hangingUp || conn !== current) return;
    current = null;
    release(conn);
    setControls("idle");
    if (reason === R().DUPLICATE_IDENTITY) {
      dropTicket();
      setStatus("ended", "this conversation continued in another tab or window");
    } else if (reason === R().ROOM_DELETED || reason === R().PARTICIPANT_REMOVED || reason === R().ROOM_CLOSED) {
      dropTicket();
      failOutbox("not sent: the conversation ended");
      divider("Conversation ended");
      setStatus("ended", "the conversation was closed by the server. Connect to start a new one.");
    } else if (reason === R().CLIENT_INITIATED) {
      dropTicket();
      setStatus("idle");
    } else {
      // A network drop that the client's own reconnection could not repair: rejoin our room with the ticket.
      rejoin(1);
    }
  }

  /** No agent joined this new room in time, or the room's agent vanished and none came back within the wait: leave
   *  it and try a new room (a fresh session: the long-term memory is the Letta agent's). The last resort: a room
   *  whose agent died normally gets a new agent in the same room within seconds (issue 12). */
  function noAgent(conn) {
    if (conn !== current) return;
    const at = W.deadline(conn.watch, {
      connectedAt: conn.connectedAt, firstWaitMs: AGENT_WAIT_MS, returnWaitMs: conn.returnWaitMs,
    });
    if (at === null) return;
    if (conn.reconnecting || Date.now() < at - 20) {
      // Our own connection is being repaired (the room's list is stale until it is), or the timer fired early.
      conn.agentTimer = setTimeout(() => noAgent(conn), conn.reconnecting ? 1000 : at - Date.now());
      return;
    }
    const lost = conn.watch.phase === "takeover";
    if (!lost && conn.tries >= MAX_ROOM_TRIES) {
      console.warn(`no agent joined after ${conn.tries} rooms`);
      setStatus("error", "no agent is available right now. Disconnect and try again in a moment.");
      return;
    }
    const waited = Math.round((lost ? conn.returnWaitMs : AGENT_WAIT_MS) / 1000);
    console.warn(lost
      ? `no agent served room ${conn.info.room} again within ${waited} s: starting over in a new room`
      : `no agent joined room ${conn.info.room} within ${waited} s: trying a new room`);
    conn.hangingUp = true;
    current = null;
    release(conn);
    dropTicket();
    setStatus("waiting", lost
      ? `the agent did not come back within ${waited} s; starting a new conversation…`
      : "the agent did not answer; trying again…");
    serial(async () => {
      await conn.room.disconnect().catch(() => {});
      if (current) return;
      if (lost) divider("The agent did not come back: new conversation");
      await openConnection({ quiet: true, tries: lost ? 1 : conn.tries + 1 });
    });
  }

  function rejoin(attempt) {
    const t = freshTicket();
    if (!t) { setStatus("ended", "the connection was lost and the conversation could not be resumed"); return; }
    setStatus("reconnecting", attempt > 1 ? `attempt ${attempt}` : "");
    setControls("busy");
    const delay = Math.min(8000, 500 * 2 ** (attempt - 1));
    setTimeout(() => {
      serial(async () => {
        if (current || !freshTicket()) return; // connected meanwhile, or the user hung up
        const result = await openConnection({ resume: t.resume, quiet: true });
        if (result === "retry" && attempt < 6 && freshTicket()) rejoin(attempt + 1);
      });
    }, delay);
  }

  /** Connect (fresh with the picked agent, or with a resume ticket): "ok", "retry" (may work later) or "fail". */
  async function openConnection({ resume, quiet, tries } = {}) {
    const agent = el.agent.value;
    setControls("busy");
    setStatus(resume ? "resuming" : "connecting");
    note("");
    let info;
    try {
      info = await api("/api/token", resume ? { resume } : { agent });
    } catch (e) {
      setControls("idle");
      if (resume && [403, 404, 409].includes(e.status)) {
        dropTicket();
        setStatus("ended", "your previous conversation has ended. Connect to start a new one.");
      } else {
        setStatus("error", e.message);
      }
      return e.status === 0 || e.status === 429 || e.status >= 500 ? "retry" : "fail";
    }
    const ttl = info.resume_expires_in ?? 30;
    saveTicket(info, ttl);
    showDetails(info);
    if (!resume && !tries) {
      writeJSON("session", KEY_TRANSCRIPT, null);
      divider("New conversation");
    } else if (resume && !quiet) {
      divider("Rejoined");
    }
    const room = new LK.Room({
      disconnectOnPageLeave: false, // a refresh is a drop + rejoin (resumed), not a hang-up
      adaptiveStream: false,
      dynacast: false,
      audioCaptureDefaults: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const saved = resume ? savedTakeover(info.room) : null;
    const conn = {
      room, info, agent: null, connected: false, reconnecting: false, hangingUp: false,
      resumed: Boolean(resume), muted: false, heardAgent: false, meter: null, renewTimer: null,
      flushing: false, tries: tries ?? 1, agentTimer: null,
      greeted: Boolean(resume), heardSpeaking: false, greetTimer: null, quietMs: GREETING_WAIT_MS,
      watch: W.initial({ resumed: Boolean(resume), since: saved?.since, from: saved?.from }),
      seen: new Map(), seq: 0, connectedAt: 0, returnWaitMs: W.returnWaitMs(info), noticeUntil: 0, noticeTimer: null,
    };
    current = conn;
    wire(conn);
    try {
      await room.connect(info.url, info.token);
    } catch (e) {
      if (conn.hangingUp) return "fail";
      current = null;
      release(conn);
      await room.disconnect().catch(() => {});
      setControls("idle");
      setStatus("error", `could not connect to LiveKit (${e?.message ?? e})`);
      return "retry";
    }
    if (conn.hangingUp || conn !== current) return "fail";
    conn.connected = true;
    conn.connectedAt = Date.now();
    updateAgent(conn);
    setControls("live");
    el.enableAudio.hidden = room.canPlaybackAudio;
    startRenewal(conn);
    if (document.activeElement === document.body || document.activeElement === el.connect || !document.activeElement) {
      el.message.focus();
    }
    try {
      const pub = await room.localParticipant.setMicrophoneEnabled(true);
      if (conn === current) startMeter(conn, pub?.track);
    } catch (e) {
      if (conn === current) note(`No microphone (${e?.message ?? e}). You can still type.`);
    }
    return "ok";
  }

  async function hangUp() {
    const conn = current;
    if (!conn) {
      // Nothing connected (e.g. a rejoin was waiting to retry): forget the session.
      dropTicket();
      setControls("idle");
      setStatus("idle");
      return;
    }
    conn.hangingUp = true;
    current = null;
    dropTicket();
    failOutbox("not sent: you hung up before the agent was ready");
    setControls("busy");
    setStatus("disconnecting");
    release(conn);
    try { await conn.room.disconnect(); } catch (e) { console.warn("disconnect:", e?.message ?? e); }
    showDetails(null);
    divider("You hung up");
    setControls("idle");
    setStatus("idle");
    if (document.activeElement === document.body || document.activeElement?.disabled) el.connect.focus();
  }

  // --- UI events -----------------------------------------------------------------------------------------------

  el.connect.addEventListener("click", () => {
    mark("sg:connect-click");
    serial(() => openConnection());
  });
  el.disconnect.addEventListener("click", () => {
    const conn = current;
    if (conn) conn.hangingUp = true; // a connect in flight gives up at once
    serial(hangUp);
  });
  el.mute.addEventListener("click", async () => {
    const conn = current;
    if (!conn) return;
    conn.muted = !conn.muted;
    el.mute.setAttribute("aria-pressed", String(conn.muted));
    el.mute.textContent = conn.muted ? "Unmute mic" : "Mute mic";
    el.levelLabel.textContent = conn.muted ? "Mic (muted)" : "Mic";
    el.level.value = 0;
    try { await conn.room.localParticipant.setMicrophoneEnabled(!conn.muted); } catch (e) {
      note(`Microphone problem: ${e?.message ?? e}`);
    }
  });
  el.enableAudio.addEventListener("click", async () => {
    const conn = current;
    if (!conn) return;
    try { await conn.room.startAudio(); } catch { /* still blocked */ }
    conn.meter?.ctx.resume().catch(() => {});
    el.enableAudio.hidden = conn.room.canPlaybackAudio;
  });
  el.chat.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const conn = current;
    const text = el.message.value.trim();
    if (!conn || !conn.connected || !text) return;
    el.message.value = "";
    const li = addEntry(null, "user", "typed", text);
    li.classList.add("pending");
    outbox.push({ text, li });
    flushOutbox(conn);
  });
  el.agent.addEventListener("change", () => {
    try { localStorage.setItem(KEY_AGENT, el.agent.value); } catch { /* private mode */ }
    describeAgent();
    setControls(current ? "live" : "idle");
  });
  window.addEventListener("pagehide", () => { if (current) saveTranscript(); });

  function describeAgent() {
    const a = agents.find((x) => x.id === el.agent.value);
    el.agentDesc.textContent = a ? (a.description || (a.default ? "The default agent." : "")) : "";
    // The packaged offline model answers (no OPENAI_API_KEY): say so, and how to switch.
    el.offlineNote.hidden = !a?.offline_demo;
    el.offlineNote.textContent = a?.offline_demo
      ? `An offline demo model (${a.model}, on this machine) is answering: short, simple replies. `
        + "For a real assistant, set OPENAI_API_KEY and start again."
      : "";
  }

  // --- start-up ------------------------------------------------------------------------------------------------

  async function loadAgents() {
    // Letta may be restarting: keep asking (bounded) and say so meanwhile.
    for (let attempt = 1; ; attempt++) {
      try {
        const data = await api("/api/agents");
        agents = data.agents ?? [];
        break;
      } catch (e) {
        el.agent.replaceChildren(new Option("No agents (see the status line)", ""));
        if (attempt >= 20 || (e.status >= 400 && e.status < 500 && e.status !== 429)) {
          setStatus("error", `could not list the agents: ${e.message}`);
          return false;
        }
        setStatus("error", `could not list the agents: ${e.message}. Trying again…`);
        await new Promise((r) => setTimeout(r, Math.min(10000, 1000 * attempt)));
      }
    }
    setStatus("idle");
    el.agent.replaceChildren(...agents.map((a) => new Option(a.default ? `${a.name} (default)` : a.name, a.id)));
    if (agents.length === 0) el.agent.replaceChildren(new Option("No agents available", ""));
    let remembered = null;
    try { remembered = localStorage.getItem(KEY_AGENT); } catch { /* private mode */ }
    const pick = agents.find((a) => a.id === remembered) ?? agents.find((a) => a.default) ?? agents[0];
    if (pick) el.agent.value = pick.id;
    describeAgent();
    return true;
  }

  async function loadHealth() {
    try {
      const r = await fetch("/api/health");
      const h = await r.json();
      el.dHealth.textContent = Object.entries(h.services ?? {}).map(([k, v]) => `${k} ${v.ok ? "ok" : "down"}`)
        .join(" · ");
    } catch { el.dHealth.textContent = "unknown"; }
  }

  async function start() {
    if (!LK || !W) {
      setStatus("error", LK ? "agentwatch.js did not load" : "livekit-client did not load (run `npm ci` in web/)");
      return;
    }
    LK.setLogLevel?.("warn");
    setStatus("idle");
    const ok = await loadAgents();
    setControls("idle");
    loadHealth();
    const ticket = freshTicket();
    if (ticket) {
      // A refresh (or a tab restored) inside the reconnect window: rejoin the same room and identity.
      if (agents.some((a) => a.id === ticket.agent)) el.agent.value = ticket.agent;
      restoreTranscript();
      divider("Rejoined after reload");
      serial(() => openConnection({ resume: ticket.resume, quiet: true }));
    } else {
      dropTicket();
      if (ok && !el.connect.disabled) el.connect.focus();
    }
  }

  start();
})();
