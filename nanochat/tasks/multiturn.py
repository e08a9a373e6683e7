"""MultiTurn: longer conversations chained from the short ones of the offline tasks.

Every offline conversation (an arithmetic word problem, a SpellingBee question, an identity
exchange) is one to four messages long, so a model fine-tuned on them alone has never answered
the fifth question of a chat: it has not learned to read past the earlier turns and their tool
calls, to answer only the newest question, and to end its answer there. A MultiTurn conversation
is 2 to `max_parts` such conversations one after the other, sometimes opened by a greeting and
closed by a thank-you, as a user of the chat UI writes them (the identity exchanges come without
the small talk of their own, which belongs at a chat's ends, not in its middle).

Conversation `index` is drawn by a generator seeded by (split, seed, index): the same arguments
always give the same conversations, with no file or download. The train split chains train
problems (and identity exchanges, which are training data only); the test split chains test
problems, so that a validation loss on it measures turns the model never saw.
"""

import random

from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.common import Task
from nanochat.tasks.identity import GREETING_REPLIES, GREETINGS, THANKS, THANKS_REPLIES, Identity, small_talk
from nanochat.tasks.spellingbee import SPLITS, SpellingBee

# Problems each member task can contribute (their index space; any index gives a valid problem).
MEMBER_POOL = 100_000


class MultiTurn(Task):
    """`size` conversations of 2 to `max_parts` offline conversations each, made from their index and `seed`."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, max_parts: int = 6, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"MultiTurn split {split!r} does not exist: choose one of {SPLITS}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} must be a positive int (the number of conversations)")
        if isinstance(max_parts, bool) or not isinstance(max_parts, int) or max_parts < 2:
            raise ValueError(f"max_parts={max_parts!r} must be an int >= 2 (conversations chained into one)")
        self.split, self.size, self.seed, self.max_parts = split, size, seed, max_parts
        self.members = [Arithmetic(split, size=MEMBER_POOL, seed=seed),
                        SpellingBee(split, size=MEMBER_POOL, seed=seed)]
        if split == "train":
            self.members.append(Identity("train", size=MEMBER_POOL, seed=seed, with_small_talk=False))

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        # A string seed goes through SHA-512 in random.seed, so it does not depend on PYTHONHASHSEED.
        rng = random.Random(f"multiturn/{self.split}/{self.seed}/{index}")
        messages = small_talk(rng, GREETINGS, GREETING_REPLIES, 0.3)
        for _ in range(rng.randint(2, self.max_parts)):
            member = rng.choice(self.members)
            messages += member.get_example(rng.randrange(member.num_examples()))["messages"]
        messages += small_talk(rng, THANKS, THANKS_REPLIES, 0.3)
        return {"messages": messages}

