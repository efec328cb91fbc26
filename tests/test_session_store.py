"""The versioned session store behind `sparsedit serve --ray` (issue 37): one lease holder per session at a time,
commits compare-and-swap on the version, expired leases taken over, resent requests answered once, limits over
every replica. Plain asyncio: no Ray needed."""

import asyncio
import base64

import numpy as np
import pytest

from sparsedit.serve.ray_app import VersionedStore


def run(coro):
    return asyncio.run(coro)


def record(n_ops=1, client="a"):
    return {"model": "m", "options": {}, "ops": [{"state": {"prompt": f"p{i}"}, "undo": False} for i in range(n_ops)],
            "client": client}  # fmt: skip


def op(i):
    return {"state": {"prompt": f"e{i}"}, "undo": False}


def test_leases_serialize_requests_and_commits_are_compare_and_swap():
    async def main():
        store = VersionedStore(lease_seconds=5)
        assert store.create("s", record(), "A") == 1
        a = await store.acquire("s", "A", {"s": 1})
        assert a["status"] == "ok" and a["version"] == 1 and a["owner_was"] == "A"  # A's copy is current
        # B waits for A's lease; it gets it only after A releases, with the committed record (A committed once).
        b_task = asyncio.create_task(store.acquire("s", "B", {}))
        await asyncio.sleep(0.05)
        assert not b_task.done()
        assert store.commit("s", a["token"], 1, op(1), "r1", {"edit": 1}) == {"version": 2}
        assert "stale" in store.commit("s", a["token"], 1, op(2))  # the version moved: no second commit from 1
        await store.release("s", a["token"])
        b = await asyncio.wait_for(b_task, 1)
        assert b["status"] == "ok" and b["version"] == 2 and b["owner_was"] == "A"
        assert [o["state"]["prompt"] for o in store.record("s")["ops"]] == ["p0", "e1"]
        assert "stale" in store.commit("s", a["token"], 2, op(2))  # A's old token can never commit again
        # A's copy is no longer the owner's: its next request elsewhere tells it to drop it.
        other = store.create("t", record(), "A")
        assert other == 1
        c = await store.acquire("t", "A", {"s": 2, "t": 1})
        assert c["drop"] == [("s", 2)]
        await store.release("t", c["token"])
        assert store.commit("s", b["token"], 2, op(2)) == {"version": 3}
        await store.release("s", b["token"])
        assert store.summary("s")["edits"] == 2 and store.summary("s")["replica"] == "B"

    run(main())


def test_an_expired_lease_is_taken_over_and_its_holder_cannot_commit():
    async def main():
        store = VersionedStore(lease_seconds=0.2)
        store.create("s", record(), "A")
        a = await store.acquire("s", "A", {"s": 1})
        assert store.renew("s", a["token"])
        # A stops renewing (its replica died): B gets the session after the lease runs out, not before.
        b = await store.acquire("s", "B", {}, wait=2)
        assert b["status"] == "ok" and b["version"] == 1
        assert not store.renew("s", a["token"])
        assert "stale" in store.commit("s", a["token"], 1, op(1))
        busy = await store.acquire("s", "C", {}, wait=0.05)  # B holds it, renewing: C is told it is busy
        assert store.renew("s", b["token"])
        assert busy["status"] == "busy" and busy["holder"] == "B"

    run(main())


def test_a_resent_request_is_answered_from_the_store_once():
    async def main():
        store = VersionedStore(lease_seconds=5, keep_replies=2)
        store.create("s", record(), "A", "create-1", {"session": "s"})
        assert (await store.acquire("s", "B", {}, "create-1"))["reply"] == {"session": "s"}
        a = await store.acquire("s", "A", {"s": 1}, "r1")
        store.commit("s", a["token"], 1, op(1), "r1", {"edit": 1})
        await store.release("s", a["token"])
        again = await store.acquire("s", "B", {}, "r1")  # the same request, sent again after its replica died
        assert again["status"] == "done" and again["reply"] == {"edit": 1}
        assert store.versions["s"] == 2  # not applied twice
        for i in (2, 3):
            lease = await store.acquire("s", "A", {"s": i}, f"r{i}")
            store.commit("s", lease["token"], i, op(i), f"r{i}", {"edit": i})
            await store.release("s", lease["token"])
        assert list(store.replies["s"]) == ["r2", "r3"]  # bounded

    run(main())


def test_progress_reported_by_a_replica_is_read_through_the_store():
    store = VersionedStore()
    store.set_progress("t", {"phase": "edit", "step": 2, "steps": 5})
    assert store.progress_of("t") == {"phase": "edit", "step": 2, "steps": 5}
    store.set_progress("t", None)
    assert store.progress_of("t") is None


def test_idle_sessions_expire_when_another_is_made_but_never_a_held_one():
    async def main():
        store = VersionedStore(idle_expiry=0.05)
        store.create("old", record(), "A")
        store.create("held", record(), "A")
        lease = await store.acquire("held", "A", {})
        await asyncio.sleep(0.1)
        assert store.reserve("new", "a") is None
        assert store.summary("old") is None and store.summary("held") is not None  # held: kept
        assert (await store.acquire("x", "A", {"old": 1}))["drop"] == [("old", 1)]  # its copies are dropped
        await store.release("held", lease["token"])

    run(main())


def test_limits_over_every_replica_and_deletion():
    async def main():
        store = VersionedStore(max_sessions=3, max_per_client=2)
        assert store.reserve("s1", "a") is None
        store.create("s1", record(), "A")
        assert store.reserve("s2", "a") is None  # being captured: counts
        assert "per client" in store.reserve("s3", "a")
        assert store.reserve("s3", "b") is None
        assert "maximum of 3 sessions" in store.reserve("s4", "c")
        store.cancel("s2")  # its capture failed: the place is free again
        assert store.reserve("s4", "c") is None
        a = await store.acquire("s1", "A", {"s1": 1})
        assert not await store.delete("s1", "not-the-token")
        assert await store.delete("s1", a["token"])
        assert (await store.acquire("s1", "B", {}))["status"] == "missing"
        assert store.summary("s1") is None
        assert "stale" in store.commit("s1", a["token"], 1, op(1))

    run(main())


@pytest.mark.parametrize("holders", [2, 6])
def test_many_waiters_each_hold_the_lease_alone(holders):
    async def main():
        store = VersionedStore(lease_seconds=5)
        store.create("s", record(), "A")
        inside, most = 0, 0

        async def one(i):
            nonlocal inside, most
            lease = await store.acquire("s", f"R{i % 2}", {})
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            assert store.commit("s", lease["token"], lease["version"], op(i))["version"] == lease["version"] + 1
            inside -= 1
            await store.release("s", lease["token"])

        await asyncio.gather(*(one(i) for i in range(holders)))
        assert most == 1 and store.versions["s"] == 1 + holders

    run(main())


# -- two replicas in one process, sharing the store (the `Editors` logic without Ray) ---------------------------------
class _Remote:
    """`actor.method.remote(...)` over a plain object, as awaitables (what the replicas call on the store actor)."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        fn = getattr(self.obj, name)

        class Method:
            @staticmethod
            def remote(*args, **kwargs):  # a sync method runs now (as a fire-and-forget actor call would)
                out = fn(*args, **kwargs)
                return out if asyncio.iscoroutine(out) else _Done(out)

        return Method


class _Done:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        return self.value
        yield


def test_two_replicas_keep_one_owner_and_every_reply_equals_the_replay():
    """Requests of one session alternate between two replicas, concurrently: each rebuilds the session from the
    committed record when the other moved it on, commits are never lost or doubled, a stale copy cannot commit,
    and every reply equals a single-process replay of the committed order."""
    from sparsedit.data import scenes
    from sparsedit.serve.models import ModelRegistry, tensor_to_png
    from sparsedit.serve.ray_app import _Editors
    from sparsedit.serve.sessions import SessionManager

    from .test_serve import FAST, stroke, unpng

    image = ((scenes.sample(1, 64, seed=1)["image"][0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    registry = ModelRegistry()

    async def main():
        store = VersionedStore(lease_seconds=5)
        remote = _Remote(store)
        replicas = [_Editors(SessionManager(registry, workers=1, reproducible=True), remote, name, 5) for name in "AB"]
        made = await replicas[0].create("c0", "s", "scene-ddpm", {"image": image}, dict(FAST), "client")
        assert "ok" in made, made
        sent = {}

        async def request(i, replica, commit):
            state = {"image": stroke(image, 4 + 6 * (i % 8), 4 + 5 * i, side=6)}
            out = await replicas[replica].request(f"r{i}", "s", "edit", state, commit)
            assert "ok" in out, out
            sent[i] = (commit, state, out["ok"])

        await asyncio.gather(*(request(i, i % 2, i % 3 != 1) for i in range(4)))
        # A resent commit (its replica "died" after the store had it) is answered once, from the store.
        version = store.versions["s"]
        again = await replicas[1].request("r0", "s", "edit", sent[0][1], True)
        assert again == {"ok": sent[0][2]} and store.versions["s"] == version
        assert {out["stats"]["replica"] for _, _, out in sent.values()} == {"A", "B"}
        # One place: the replica that last took the session owns it; the other's copy is dropped at its next
        # request (of any session).
        record = store.record("s")
        other = next(r for r in replicas if r.name != record["owner"])
        await other.create("c1", "t", "scene-ddpm", {"image": image}, dict(FAST), "client")
        await other.request("i1", "t", "edit", {"image": image}, False)
        assert [r.name for r in replicas if "s" in r.manager.sessions] == [record["owner"]]
        return record, list(sent.values())

    record, sent = asyncio.run(main())
    commits = [out for commit, _, out in sent if commit]
    assert sorted(out["edit"] for out in commits) == list(range(1, len(record["ops"])))  # none lost, none twice
    # The single-process replay of the committed order.
    manager = SessionManager(registry, workers=1, reproducible=True)
    session, _ = manager.create("scene-ddpm", record["ops"][0]["state"], record["options"], "replay")
    expect = {}
    for k, op_ in enumerate(record["ops"][1:], 1):
        previews = [(state, out) for commit, state, out in sent if not commit and out["edit"] == k - 1]
        for state, out in previews:
            expect[id(out)] = manager.edit("replay", state, commit=False)[0]
        expect[k] = manager.edit("replay", op_["state"], commit=True)[0]
    for state, out in [(s, o) for c, s, o in sent if not c and o["edit"] == len(record["ops"]) - 1]:
        expect[id(out)] = manager.edit("replay", state, commit=False)[0]
    for commit, _, out in sent:
        want = expect[out["edit"]] if commit else expect[id(out)]
        assert np.array_equal(unpng(out["image"]), unpng(base64.b64encode(tensor_to_png(want)).decode()))
    manager.close()
