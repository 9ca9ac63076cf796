// Which agent the page talks to, and what it shows about it: a pure function of what the room lists.
//
// No DOM, no timers, no LiveKit objects: app.js (the shell) turns the room's participants into plain records, calls
// `track` on every change, and arms one timer at `deadline`. The same file runs in Node for the unit tests
// (tests/unit/web/agentwatch.test.mjs).
//
// Phases of one connection:
//   waiting   no agent has been in this room yet (a new room): after `firstWaitMs` the page tries a new room.
//   live      the page talks to an agent (the newest one of its agent name).
//   takeover  the agent it talked to is gone, or a newer one joined and is not serving yet: "Agent reconnecting…".
//             A room whose job died gets a new agent in the same room (issue 12); only when no agent has served
//             for `returnWaitMs` since the trouble began does the page give up and go to a new room (agents that
//             join and leave meanwhile, or join and never serve, do not start the wait over).
"use strict";

(function (root, factory) {
  const api = factory();
  if (typeof module === "object" && module.exports) module.exports = api;
  else root.SGAgentWatch = api;
})(typeof self !== "undefined" ? self : globalThis, () => {
  /** `lk.agent.state` values of an agent whose session runs and answers. ("initializing": still starting.) */
  const SERVING = new Set(["listening", "thinking", "speaking", "idle"]);

  /** The page's fallback when the token server does not say how long an agent may take to come back: longer than a
   * crash takeover (≤ 10 s) and a worker restart on one machine inside the default reconnect window (30 s). */
  const DEFAULT_RETURN_WAIT_MS = 30000;

  /**
   * The agent to talk to: the newest agent participant of `agentName` (agents of other names are not ours; an agent
   * without a name attribute is accepted). Newest = latest `joinedAt` (LiveKit gives seconds), then the latest the
   * page saw (`seq`): a new agent that takes the room over joins after the dead one, which may still be listed.
   * @param {{identity: string, name: string, joinedAt: number, seq: number, state: string}[]} agents
   */
  function pickAgent(agents, agentName) {
    let best = null;
    for (const a of agents) {
      if (agentName && a.name && a.name !== agentName) continue;
      if (!best || a.joinedAt > best.joinedAt || (a.joinedAt === best.joinedAt && a.seq > best.seq)) best = a;
    }
    return best;
  }

  /** The model of a new connection. A resumed one (refresh, network drop) had an agent before; `since`/`from`
   * carry a takeover that was under way when the page reloaded, so its deadline does not start over. */
  function initial({ resumed = false, since = null, from = null } = {}) {
    return {
      agent: null, hadAgent: Boolean(resumed), phase: resumed ? "takeover" : "waiting",
      since: resumed && Number.isFinite(since) ? since : null, from: resumed ? from ?? null : null,
      reconnected: false,
    };
  }

  /**
   * The next model, from the agents the room lists now (whatever order the events came in: only the list counts).
   * `reconnected` is true on exactly the step where a takeover ends with another agent serving.
   */
  function track(prev, { agents, agentName, now }) {
    const pick = pickAgent(agents, agentName);
    if (!pick && !prev.hadAgent) return { ...prev, agent: null, phase: "waiting", reconnected: false };
    const id = pick ? pick.identity : null;
    if (!prev.hadAgent) return { agent: id, hadAgent: true, phase: "live", since: null, from: null, reconnected: false };
    if (prev.phase === "live" && id !== null && id === prev.agent) return { ...prev, reconnected: false };
    // The agent changed or is gone, or a takeover is under way: the one we talked to before the trouble began is
    // `from`, and the trouble began at `since`.
    const from = prev.phase === "takeover" ? prev.from : prev.agent;
    const since = prev.phase === "takeover" ? prev.since ?? now : now;
    if (!pick || !SERVING.has(pick.state)) {
      return { agent: id, hadAgent: true, phase: "takeover", since, from, reconnected: false };
    }
    return { agent: id, hadAgent: true, phase: "live", since: null, from: null, reconnected: from !== null && from !== id };
  }

  /** When the page stops waiting and goes to a new room (ms, same clock as `now`), or null while an agent serves. */
  function deadline(model, { connectedAt, firstWaitMs, returnWaitMs }) {
    if (model.phase === "waiting") return connectedAt + firstWaitMs;
    if (model.phase === "takeover") return (model.since ?? connectedAt) + returnWaitMs;
    return null;
  }

  /** [status state, detail] for the status line; `agentState` is the current agent's `lk.agent.state`. */
  function status(model, agentState) {
    if (model.phase === "waiting") return ["waiting"];
    if (model.phase === "takeover") return ["agent-reconnecting"];
    if (agentState === "listening" || agentState === "thinking" || agentState === "speaking") return [agentState];
    if (agentState === "idle") return ["listening"];
    return ["initializing"];
  }

  /** How long the page waits for an agent to come back, from the token server's answer (seconds), else 30 s. */
  function returnWaitMs(info) {
    const s = Number(info?.agent_return_wait);
    return Number.isFinite(s) && s > 0 ? s * 1000 : DEFAULT_RETURN_WAIT_MS;
  }

  return { DEFAULT_RETURN_WAIT_MS, SERVING, pickAgent, initial, track, deadline, status, returnWaitMs };
});
