// The page's agent tracking (web/static/agentwatch.js) in Node's own test runner: events in odd orders.
// Run: node --test tests/unit/web/ (test_agentwatch.py runs it under pytest).
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

const W = createRequire(import.meta.url)("../../../web/static/agentwatch.js");
const NAME = "session-guard";
const WAITS = { connectedAt: 1000, firstWaitMs: 10000, returnWaitMs: 30000 };

/** An agent record as app.js makes it from a RemoteParticipant. */
function agent(identity, { joinedAt = 100, seq = 1, state = "listening", name = NAME } = {}) {
  return { identity, name, joinedAt, seq, state };
}

/** Feed snapshots of the room's agent list (with the time they were seen) through `track`. */
function run(model, ...steps) {
  const out = [];
  for (const [agents, now] of steps) {
    model = W.track(model, { agents, agentName: NAME, now });
    out.push(model);
  }
  return out;
}

test("the newest agent of the room's name is picked; others' agents are not ours", () => {
  const old = agent("agent-old", { joinedAt: 100, seq: 1 });
  const fresh = agent("agent-new", { joinedAt: 130, seq: 2, state: "" });
  assert.equal(W.pickAgent([old, fresh], NAME).identity, "agent-new");
  assert.equal(W.pickAgent([fresh, old], NAME).identity, "agent-new", "list order does not matter");
  // Same second (LiveKit's joinedAt has seconds): the one the page saw last.
  const a = agent("agent-a", { joinedAt: 100, seq: 5 });
  const b = agent("agent-b", { joinedAt: 100, seq: 4 });
  assert.equal(W.pickAgent([a, b], NAME).identity, "agent-a");
  assert.equal(W.pickAgent([agent("agent-avatar", { joinedAt: 999, name: "avatar" }), old], NAME).identity, "agent-old");
  assert.equal(W.pickAgent([agent("agent-noname", { name: "" })], NAME).identity, "agent-noname");
  assert.equal(W.pickAgent([], NAME), null);
});

test("a new room: waiting, then the first agent; no agent for 10 s: the deadline of a new room", () => {
  const start = W.initial();
  assert.equal(start.phase, "waiting");
  assert.equal(W.deadline(start, WAITS), 11000);
  assert.deepEqual(W.status(start), ["waiting"]);
  const [first] = run(start, [[agent("agent-1", { state: "" })], 2000]);
  assert.equal(first.phase, "live");
  assert.equal(W.deadline(first, WAITS), null);
  assert.deepEqual(W.status(first, undefined), ["initializing"], "the first agent starting is not a takeover");
  assert.deepEqual(W.status(first, "idle"), ["listening"]);
});

test("crash: the agent disconnects, a new one joins and serves: reconnecting, then reconnected once", () => {
  const steps = run(
    W.initial(),
    [[agent("agent-1")], 2000],
    [[], 5000], // the dead agent timed out by livekit-server
    [[agent("agent-2", { joinedAt: 200, seq: 2, state: "" })], 8000], // the new agent joined
    [[agent("agent-2", { joinedAt: 200, seq: 2, state: "initializing" })], 8500],
    [[agent("agent-2", { joinedAt: 200, seq: 2, state: "listening" })], 9000],
    [[agent("agent-2", { joinedAt: 200, seq: 2, state: "speaking" })], 9500],
  );
  assert.deepEqual(steps.map((m) => m.phase), ["live", "takeover", "takeover", "takeover", "live", "live"]);
  assert.deepEqual(steps.map((m) => m.reconnected), [false, false, false, false, true, false]);
  assert.equal(steps[1].since, 5000);
  assert.equal(W.deadline(steps[1], WAITS), 35000, "30 s from when the agent vanished, not from the connect");
  assert.equal(W.deadline(steps[2], WAITS), 35000, "an agent that is only starting does not move the deadline");
  assert.equal(W.deadline(steps[4], WAITS), null, "an agent serves: no deadline");
  assert.deepEqual(W.status(steps[1]), ["agent-reconnecting"]);
  assert.deepEqual(W.status(steps[3], "initializing"), ["agent-reconnecting"]);
  assert.equal(steps[4].agent, "agent-2");
});

test("the new agent joins while the dead one is still listed, and the old one's disconnect comes last", () => {
  const old = agent("agent-1", { joinedAt: 100, seq: 1 }); // its attributes stay "listening": it is dead, not silent
  const steps = run(
    W.initial(),
    [[old], 2000],
    [[old, agent("agent-2", { joinedAt: 112, seq: 2, state: "" })], 4000],
    [[old, agent("agent-2", { joinedAt: 112, seq: 2, state: "listening" })], 5000],
    [[agent("agent-2", { joinedAt: 112, seq: 2, state: "listening" })], 20000], // the old one timed out at last
  );
  assert.deepEqual(steps.map((m) => [m.agent, m.phase, m.reconnected]), [
    ["agent-1", "live", false],
    ["agent-2", "takeover", false],
    ["agent-2", "live", true],
    ["agent-2", "live", false],
  ]);
  assert.equal(steps[1].since, 4000, "the trouble began when the new agent joined");
  assert.deepEqual(steps.map((m) => W.deadline(m, WAITS)), [null, 34000, null, null]);
});

test("a duplicate agent that joins and leaves at once: back to the first one, no 'reconnected'", () => {
  const first = agent("agent-1", { joinedAt: 100, seq: 1 });
  const steps = run(
    W.initial(),
    [[first], 2000],
    [[first, agent("agent-dup", { joinedAt: 101, seq: 2, state: "" })], 3000],
    [[first], 3500],
  );
  assert.deepEqual(steps.map((m) => [m.agent, m.phase, m.reconnected]), [
    ["agent-1", "live", false],
    ["agent-dup", "takeover", false],
    ["agent-1", "live", false],
  ]);
});

test("no agent serves again: the deadline is the return wait after the loss, whoever joins and leaves meanwhile", () => {
  const [, lost, again] = run(W.initial(), [[agent("agent-1")], 2000], [[], 6000], [[], 9000]);
  assert.equal(lost.since, 6000);
  assert.equal(again.since, 6000, "more events while waiting keep the first loss time");
  assert.equal(W.deadline(again, { ...WAITS, returnWaitMs: 4000 }), 10000);
  const [joined, left] = run(again, [[agent("agent-2", { joinedAt: 200, seq: 2, state: "" })], 12000], [[], 14000]);
  assert.deepEqual([joined.phase, joined.since, W.deadline(joined, WAITS)], ["takeover", 6000, 36000]);
  assert.deepEqual([left.phase, left.since, left.from], ["takeover", 6000, "agent-1"]);
});

test("a new agent that joins but never serves (its session failed to start): the page still gives up in time", () => {
  const stuck = agent("agent-2", { joinedAt: 200, seq: 2, state: "" });
  const [, , later] = run(W.initial(), [[agent("agent-1")], 2000], [[stuck], 5000], [[stuck], 30000]);
  assert.deepEqual([later.agent, later.phase], ["agent-2", "takeover"]);
  assert.equal(W.deadline(later, WAITS), 35000);
  assert.deepEqual(W.status(later, "initializing"), ["agent-reconnecting"]);
});

test("a refresh while reconnecting keeps the deadline and still says 'reconnected' when an agent serves", () => {
  const resumed = W.initial({ resumed: true, since: 6000, from: "agent-1" });
  assert.equal(resumed.phase, "takeover");
  const [nobody, back] = run(resumed, [[], 9000], [[agent("agent-2", { joinedAt: 200, seq: 1 })], 10000]);
  assert.equal(nobody.since, 6000);
  assert.equal(W.deadline(nobody, WAITS), 36000);
  assert.deepEqual([back.phase, back.reconnected], ["live", true]);
});

test("a refresh (no takeover under way): the agent is there; none: a takeover starts, with the longer wait", () => {
  const [steady] = run(W.initial({ resumed: true }), [[agent("agent-1")], 2000]);
  assert.deepEqual([steady.phase, steady.reconnected], ["live", false]);
  const [none] = run(W.initial({ resumed: true }), [[], 2000]);
  assert.deepEqual([none.phase, none.since, none.from], ["takeover", 2000, null]);
  assert.equal(W.deadline(none, WAITS), 32000, "a rejoined room is not a new room: not the 10 s wait");
  const [back] = run(none, [[agent("agent-1")], 3000]);
  assert.deepEqual([back.phase, back.reconnected], ["live", false], "the same agent: nothing to announce");
  // Garbage from storage is ignored.
  assert.equal(W.initial({ resumed: true, since: "soon" }).since, null);
});

test("the return wait comes from the token server's answer, else 30 s", () => {
  assert.equal(W.returnWaitMs({ agent_return_wait: 4 }), 4000);
  assert.equal(W.returnWaitMs({ agent_return_wait: 90.5 }), 90500);
  for (const bad of [undefined, null, {}, { agent_return_wait: 0 }, { agent_return_wait: -1 }, { agent_return_wait: "x" }]) {
    assert.equal(W.returnWaitMs(bad), 30000);
  }
});
