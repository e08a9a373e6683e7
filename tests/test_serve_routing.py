"""Tests of prefix-aware routing (serve/routing.py) without a cluster: the router's choices on
stand-in replicas, and the keys it routes by.

A conversation's turns share their keys up to the new messages; its home is the same for every
router and moves only when its replica goes; homes spread over the replicas. The router sends a
request to the replica known to hold its longest prefix (its own record, or what a replica
reports), else to the home, unless that replica's queue is longer than the shortest by more than
the imbalance: then, as for calls other than generate, Serve's power of two choices. The whole
path, with Serve's real routers and HTTP clients, is bench_routing's, which tests/test_bench_smoke.py
runs.
"""

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from serve.routing import PrefixAffinityRouter, conversation_keys, home_replica


@dataclass(frozen=True)
class ReplicaId:
    unique_id: str


@dataclass
class Replica:
    replica_id: ReplicaId
    routing_stats: dict = field(default_factory=dict)


@dataclass
class Metadata:
    call_method: str = "generate"


@dataclass
class RoutingContext:
    should_backoff: bool = False


@dataclass
class Pending:
    args: list
    metadata: Metadata = field(default_factory=Metadata)
    routing_context: RoutingContext = field(default_factory=RoutingContext)


class QueueLengths(dict):
    def get(self, replica_id, default=None):
        return super().get(replica_id, default)


def make_router(imbalance: int = 4) -> PrefixAffinityRouter:
    """The router's policy alone: Serve's constructor (event loop, handles, metrics) is not needed.
    Its queue lengths (replica id -> ongoing requests) are set through router.replica_queue_len_cache."""
    router = object.__new__(PrefixAffinityRouter)
    router._replica_queue_len_cache = QueueLengths()
    router.initialize_state(imbalance=imbalance)
    return router


def chat(*contents: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"]
    messages = ([{"role": "system", "content": system}] if system else [])
    messages += [{"role": roles[i % 2], "content": content} for i, content in enumerate(contents)]
    return {"messages": messages, "prompt": None}


def route(router, replicas, settings) -> list[list[Replica]]:
    pending = Pending([settings])
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    router.on_request_routed(pending, ranks[0][0].replica_id, None)
    return ranks


@pytest.fixture
def replicas():
    return [Replica(ReplicaId(f"replica-{i}")) for i in range(3)]


def test_a_turn_shares_the_keys_of_the_history_it_resends_and_is_anchored_at_the_first_user_message():
    first, anchor = conversation_keys(chat("Hi", system="Be brief."))
    second, second_anchor = conversation_keys(chat("Hi", "Hello!", "And 7 times 6?", system="Be brief."))
    assert anchor == second_anchor == 1 and second[:2] == first and len(second) == 4
    # every key covers everything before it: the same message after another history is another key
    other, _ = conversation_keys(chat("Hi", system="Be verbose."))
    assert not set(other) & set(second)
    assert conversation_keys(chat("Hi"))[1] == 0
    text, text_anchor = conversation_keys({"messages": None, "prompt": "x" * 600})
    assert len(text) == 3 and text_anchor == 0 and conversation_keys({"messages": None, "prompt": None}) == ([], 0)


def test_a_conversations_home_is_the_same_for_every_router_moves_only_with_its_replica_and_homes_spread(replicas):
    ids = [replica.replica_id for replica in replicas]
    anchors = [conversation_keys(chat(f"question {i}"))[0][0] for i in range(600)]
    homes = [home_replica(anchor, ids) for anchor in anchors]
    assert homes == [home_replica(anchor, list(reversed(ids))) for anchor in anchors]
    assert all(150 < homes.count(replica_id) < 250 for replica_id in ids)
    # replica 2 goes: only its conversations move
    after = [home_replica(anchor, ids[:2]) for anchor in anchors]
    assert all(a == h for a, h in zip(after, homes) if h != ids[2])


def test_turns_follow_the_conversation_and_the_load_decides_only_past_the_imbalance(replicas):
    router = make_router(imbalance=4)
    queues = router.replica_queue_len_cache
    history = ("Hi", "Hello!", "And 7 times 6?")
    ranks = route(router, replicas, chat(*history[:1], system="Be brief."))
    home = ranks[0][0]
    assert len(ranks) == 2 and ranks[0] == [home] and set(r.replica_id for r in ranks[1]) == (
        {r.replica_id for r in replicas} - {home.replica_id})
    assert home.replica_id == home_replica(conversation_keys(chat("Hi", system="Be brief."))[0][1],
                                           [r.replica_id for r in replicas])
    # the next turn goes where the history is, even when the home would now be another replica
    others = [r for r in replicas if r is not home]
    assert route(router, others + [home], chat(*history, system="Be brief."))[0] == [home]
    # a queue 4 longer than the shortest is still worth the hit; 5 is not: two random replicas
    queues[home.replica_id] = 4
    assert route(router, replicas, chat(*history, system="Be brief."))[0] == [home]
    queues[home.replica_id] = 5
    random.seed(0)
    ranks = route(router, replicas, chat(*history, system="Be brief."))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    # Serve sent that turn to another replica: the conversation's next turn follows it there
    elsewhere = next(r for r in replicas if r is not home)
    router.on_request_routed(Pending([chat(*history, system="Be brief.")]), elsewhere.replica_id, None)
    queues[home.replica_id] = 0
    assert route(router, replicas, chat(*history, "42.", "Thanks!", system="Be brief."))[0] == [elsewhere]
    assert router.stats == {"held": 3, "home": 1, "balanced": 1}


def test_a_fresh_router_finds_the_history_in_what_the_replicas_report(replicas):
    history = chat("Hi", "Hello!", "And 7 times 6?")
    keys, anchor = conversation_keys(chat("Hi"))
    home = home_replica(keys[anchor], [r.replica_id for r in replicas])
    holder = next(r for r in replicas if r.replica_id != home)
    holder.routing_stats = {"prefix_keys": keys}  # the first turn was served there, not at home
    assert route(make_router(), replicas, history)[0] == [holder]


def test_other_calls_and_a_single_replica_get_serves_default_choice(replicas):
    router = make_router()
    stats_call = Pending([], Metadata(call_method="stats"))
    ranks = asyncio.run(router.choose_replicas(replicas, stats_call))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    # Serve backs off between tries only when told to: else, with every replica full, its loop spins
    assert stats_call.routing_context.should_backoff
    assert asyncio.run(router.choose_replicas(replicas[:1], Pending([chat("Hi")]))) == [replicas[:1]]
    assert asyncio.run(router.choose_replicas([], Pending([chat("Hi")]))) == []
