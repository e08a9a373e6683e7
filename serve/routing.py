"""Prefix-aware routing: a conversation's next turn goes to the ChatModel replica whose prefix cache
holds its history, unless that replica is much busier than the others.

Each replica keeps a prefix cache of its own (nanochat.prefix_cache), so with several replicas a
turn that lands on another replica than the previous turn prefills the whole conversation again.
Ray Serve 2.60 lets a deployment choose its request router (`RequestRouterConfig`, the
`ray.serve.request_router` extension point); `PrefixAffinityRouter` is ours.

A request's keys are chained digests of its messages (key j covers messages 0..j), or of
256-character pieces of a text completion's prompt. Each ingress replica has a router of its own,
and a conversation's turns come through any of them, so the home of a conversation is a function
of the conversation alone: rendezvous hashing of its anchor key (the key that covers the first
user message, or the prompt's first piece) over the replicas' ids. Every router picks the same
replica without talking to the others, and when a replica comes or goes only the conversations
whose home it was move. A shared system prompt is not the anchor, so the conversations that share
it spread over the replicas (each caches it once).

Where the home was too busy, a turn went elsewhere, and its history is cached there. So before
the home, a router looks for the replica known to hold the longest prefix of the request, from
two sources:
- its own record of where it sent each key (least recently routed forgotten first);
- the keys each replica reports itself, every `request_routing_stats_period_s`, through
  `ChatModel.record_routing_stats` (the keys of the requests it served lately).

The chosen replica (the known holder, else the home) takes the request when its queue is at most
`imbalance` requests longer than the shortest (Serve's cached queue lengths); otherwise, and for a
request without keys, the shorter queue of two random replicas wins, as with Serve's default
router. One hot prefix thus cannot pin the traffic on one replica.
"""

import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

PROMPT_PIECE_CHARS = 256  # a text completion's prompt is keyed in pieces of this many characters
ROUTED_KEYS_KEPT = 65536  # keys a router remembers where it sent
SERVED_KEYS_KEPT = 4096  # keys a replica reports (its prefix cache holds some thousands of blocks at most)


def conversation_keys(settings: dict) -> tuple[list[str], int]:
    """(the chained digests of a generation request's messages or prompt pieces, shortest first;
    the index of its anchor key, the one that covers the first user message)."""
    anchor = 0
    if settings.get("messages") is not None:
        messages = settings["messages"]
        pieces = [f"{message['role']}\0{message['content']}" for message in messages]
        anchor = next((i for i, message in enumerate(messages) if message["role"] == "user"), 0)
    elif settings.get("prompt") is not None:
        prompt = settings["prompt"]
        pieces = [prompt[start:start + PROMPT_PIECE_CHARS] for start in range(0, len(prompt), PROMPT_PIECE_CHARS)]
    else:
        return [], 0
    keys, digest = [], hashlib.blake2b(digest_size=16)
    for piece in pieces:
        digest.update(piece.encode("utf-8", "surrogatepass") + b"\1")
        keys.append(digest.copy().hexdigest())
    return keys, anchor


def home_replica(anchor_key: str, replica_ids: list) -> object:
    """The replica id with the highest hash of (anchor key, id): rendezvous hashing."""
    return max(replica_ids, key=lambda replica_id: hashlib.blake2b(
        f"{anchor_key}\0{replica_id.unique_id}".encode(), digest_size=8).digest())


class RecentKeys:
    """Keys with a value each, the least recently written forgotten first beyond `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, object] = OrderedDict()

    def put(self, keys: list[str], value: object = None) -> None:
        for key in keys:
            self._items[key] = value
            self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: str, default=None):
        return self._items.get(key, default)

    def keys(self) -> list[str]:
        return list(self._items)


def request_settings(pending_request: PendingRequest | None) -> dict | None:
    """The settings dict of a ChatModel.generate call (None for the other methods)."""
    if pending_request is None or pending_request.metadata.call_method != "generate" or not pending_request.args:
        return None
    settings = pending_request.args[0]
    return settings if isinstance(settings, dict) else None


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Routes a request to the replica that holds the longest start of it (see the module docstring).

    With Serve's FIFOMixin, as its own routers have: without it, a chosen replica that Serve cannot
    match to the request it was chosen for is offered again at once, and a loaded ingress spun
    (seen in a test run). FIFO hands a chosen replica to the oldest waiting request, which is this
    request unless several wait at once."""

    def initialize_state(self, imbalance: int = 4, **kwargs):
        """`imbalance`: how many more queued requests than the shortest queue a prefix hit is worth."""
        self.imbalance = imbalance
        self.routed = RecentKeys(ROUTED_KEYS_KEPT)  # key -> replica id
        self._reported: dict = {}  # replica id -> (its reported key list, that list as a set)
        self.stats = {"held": 0, "home": 0, "balanced": 0}

    def _holder(self, keys: list[str], replicas: dict) -> tuple[object, int]:
        """(replica id, keys matched) of the longest known prefix among `replicas` (None, 0 if none)."""
        reported = {replica_id: self._reported_keys(replica) for replica_id, replica in replicas.items()}
        if len(self._reported) > len(replicas):  # forget the replicas that are gone
            self._reported = {replica_id: self._reported[replica_id] for replica_id in replicas}
        for depth in range(len(keys), 0, -1):
            key = keys[depth - 1]
            routed = self.routed.get(key)
            if routed in replicas:
                return routed, depth
            for replica_id, held in reported.items():
                if key in held:
                    return replica_id, depth
        return None, 0

    def _reported_keys(self, replica: RunningReplica) -> set:
        """The keys `replica` last reported, as a set made once per report."""
        keys = replica.routing_stats.get("prefix_keys", ())
        cached = self._reported.get(replica.replica_id)
        if cached is None or cached[0] is not keys:
            cached = self._reported[replica.replica_id] = (keys, set(keys))
        return cached[1]

    def _queue_len(self, replica: RunningReplica) -> int:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queue_len is None else queue_len

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Serve's loop retries at once until something sets this (its LocalityMixin does): with
            # every replica full it would spin and starve its own queue-length probes.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        settings = request_settings(pending_request)
        keys, anchor = conversation_keys(settings) if settings is not None else ([], 0)
        if keys and len(candidate_replicas) > 1:
            replicas = {replica.replica_id: replica for replica in candidate_replicas}
            chosen, _ = self._holder(keys, replicas)
            reason = "held"
            if chosen is None:
                chosen, reason = home_replica(keys[anchor], list(replicas)), "home"
            shortest = min(self._queue_len(replica) for replica in candidate_replicas)
            if self._queue_len(replicas[chosen]) - shortest <= self.imbalance:
                self.stats[reason] += 1
                others = [replica for replica in candidate_replicas if replica.replica_id != chosen]
                return [[replicas[chosen]], others]
            self.stats["balanced"] += 1
        # Serve's default: the shorter queue of two random replicas.
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        settings = request_settings(pending_request)
        if settings is not None:
            self.routed.put(conversation_keys(settings)[0], replica_id)
