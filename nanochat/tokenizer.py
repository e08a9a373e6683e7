"""The byte-level BPE tokenizer of nanochat: trained with rustbpe, run with tiktoken.

Training and encoding are split between two libraries because each is good at one half:
rustbpe learns the merges from a stream of text in parallel and in little memory, and tiktoken
encodes with those merges far faster than any trainer's own encoder. The learned merges
(token bytes -> rank) plus the special tokens below make a `tiktoken.Encoding`, and that
encoding's pieces are what we save, so loading a tokenizer never needs rustbpe.

The same tokenizer turns chat conversations into token ids with a training mask
(`render_conversation`): the model is trained only on what the assistant writes.

tokenizer.pkl is written in karpathy/nanochat's format, a pickled tiktoken Encoding, so that a
checkpoint's tokenizer folder serves both projects unchanged. It is read through an unpickler
that admits only that one class (and builds the Encoding itself from the plain pieces), so a
tokenizer.pkl from elsewhere cannot run code; the older format of this project, a pickled dict of
the same pieces, is read as well.

PyTorch is imported only by the three functions of token_bytes.pt: the Ray Data workers that
tokenize pretraining text import this module, and torch's import would be a second of their start.
"""

import copy
import os
import pickle
from typing import TYPE_CHECKING

import rustbpe
import tiktoken

from nanochat.files import atomic_write_bytes, get_base_dir

if TYPE_CHECKING:
    import torch

# The special tokens come after the BPE vocabulary, in this order, so their ids are
# len(mergeable_ranks) + index. Only <|bos|> appears in pretraining (it starts every document);
# the others delimit the turns and tool calls of a chat conversation.
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output is pasted back in
    "<|output_end|>",
]

# The GPT-4 (cl100k) pre-tokenization split with one change, as in nanochat: digit runs are cut
# into groups of at most 2 (\p{N}{1,2}) rather than 3. With 3, the 1000 three-digit numbers each
# want a token of their own, a large share of a small vocabulary (ours is 32K-64K, GPT-4's 100K)
# spent on numbers; with 2 there are only 100 such pieces and the rest of the vocabulary goes to words.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
ROLES = ("system", "user", "assistant")
ASSISTANT_PART_TYPES = ("text", "python", "python_output")


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens, plus the chat rendering on top of it."""

    def __init__(self, encoding: tiktoken.Encoding):
        missing = [name for name in SPECIAL_TOKENS if name not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"the encoding {encoding.name!r} lacks the special tokens {missing}; "
                             "build it with Tokenizer.train_from_iterator")
        self.encoding = encoding
        self._special_ids = {name: encoding.encode_single_token(name) for name in SPECIAL_TOKENS}

    # ----------------------------------------------------------------------------------------
    # Building, saving and loading

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int) -> "Tokenizer":
        """Learn BPE merges from an iterator of strings. `vocab_size` counts the special tokens.

        The result can be smaller than asked for when the text has too few distinct byte pairs to
        merge; `get_vocab_size()` tells the size actually reached.
        """
        min_vocab_size = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_vocab_size:
            raise ValueError(f"vocab_size={vocab_size!r} is too small: it must be an int of at least "
                             f"{min_vocab_size} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(_build_encoding(trainer.get_pattern(), mergeable_ranks))

    def save(self, tokenizer_dir: str) -> str:
        """Write tokenizer.pkl (nanochat's format: the pickled Encoding) into `tokenizer_dir`
        atomically; returns the file's path."""
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        atomic_write_bytes(path, pickle.dumps(self.encoding, protocol=pickle.HIGHEST_PROTOCOL))
        return path

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> "Tokenizer":
        """Load the tokenizer.pkl in `tokenizer_dir`: one that `save` or karpathy/nanochat wrote."""
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m ray_jobs.tok_train` "
                                    "or point to the directory that holds tokenizer.pkl")
        try:
            with open(path, "rb") as f:
                pieces = _PiecesUnpickler(f).load()
            if isinstance(pieces, _EncodingPieces):
                pieces = pieces.state
            return cls(_build_encoding(pieces["pat_str"], pieces["mergeable_ranks"], pieces["special_tokens"]))
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"the tokenizer file {path} is corrupt or not a nanochat tokenizer ({e!r}); "
                             "delete it and train again with `python -m ray_jobs.tok_train`") from e

    # ----------------------------------------------------------------------------------------
    # Vocabulary

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        """The id of one special token, by its exact name such as '<|bos|>'."""
        if name not in self._special_ids:
            raise ValueError(f"{name!r} is not a special token; the special tokens are {SPECIAL_TOKENS}")
        return self._special_ids[name]

    def get_bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (a token that ends inside a UTF-8 character shows U+FFFD)."""
        return self.decode([token_id])

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Token ids of a string, or a list of id lists for a list of strings (encoded in parallel).

        `prepend`/`append` add one special token, given by id or by name, around each text.
        Text is always encoded as ordinary text: a document that spells out "<|bos|>" gets the
        tokens of those characters, never the special id, so data can not forge a turn boundary.
        """
        prefix = [] if prepend is None else [self._special_token_id(prepend, "prepend")]
        suffix = [] if append is None else [self._special_token_id(append, "append")]
        if isinstance(text, str):
            return prefix + self.encoding.encode_ordinary(text) + suffix
        if isinstance(text, list):
            bad = [i for i, item in enumerate(text) if not isinstance(item, str)]
            if bad:
                raise ValueError(f"encode got a list whose items {bad[:5]} are not strings "
                                 f"(first is {type(text[bad[0]]).__name__}); pass a list of str")
            rows = self.encoding.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + row + suffix for row in rows]
        raise ValueError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def _special_token_id(self, token, argument: str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"{argument}={token!r} must be a special token name such as '<|bos|>' "
                         f"or a token id in [0, {self.get_vocab_size()})")

    # ----------------------------------------------------------------------------------------
    # Chat conversations

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a chat conversation and a mask that is 1 where the model should learn.

        conversation = {"messages": [{"role": ..., "content": ...}, ...]}: an optional system
        message, then user and assistant messages in turns, starting with the user. The mask is 1
        on everything the assistant produces (its text, its python calls with their delimiters,
        its <|assistant_end|>) and 0 on the rest: <|bos|>, the user turns, <|assistant_start|>
        (the prompt hands it over) and tool outputs, which the python tool writes at run time.
        Both lists are cut to `max_tokens`.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive int")
        ids, mask = self._render(_merged_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The conversation without its last (assistant) message, ending in <|assistant_start|>:
        the prompt from which the model writes the answer (RL rollouts, chat evals). Not truncated."""
        messages = _messages_of(conversation)
        if messages[-1].get("role") != "assistant":
            raise ValueError(f"render_for_completion needs a conversation that ends with an assistant "
                             f"message (it is replaced by the model's answer); the last message, "
                             f"messages[{len(messages) - 1}], has role {messages[-1].get('role')!r}")
        prompt = {**conversation, "messages": messages[:-1]}
        ids, _ = self._render(_merged_messages(prompt))
        return ids + [self._special_ids["<|assistant_start|>"]]

    def _render(self, messages: list[tuple[int, dict]]) -> tuple[list[int], list[int]]:
        special = self._special_ids
        ids, mask = [special["<|bos|>"]], [0]

        def add(token_ids: list[int], trained: int) -> None:
            ids.extend(token_ids)
            mask.extend([trained] * len(token_ids))

        for index, message in messages:
            content = message["content"]
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise ValueError(f"messages[{index}] is a user message whose content is a "
                                     f"{type(content).__name__}; user content must be a string")
                add([special["<|user_start|>"]] + self.encode(content) + [special["<|user_end|>"]], 0)
                continue
            add([special["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part_index, part in enumerate(content):
                    self._render_assistant_part(part, f"messages[{index}].content[{part_index}]", add)
            else:
                raise ValueError(f"messages[{index}] is an assistant message whose content is a "
                                 f"{type(content).__name__}; use a string or a list of parts "
                                 '{"type": "text"|"python"|"python_output", "text": str}')
            add([special["<|assistant_end|>"]], 1)
        return ids, mask

    def _render_assistant_part(self, part, where: str, add) -> None:
        if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES \
                or not isinstance(part.get("text"), str):
            raise ValueError(f"{where} is {part!r}; an assistant part must be "
                             f'{{"type": one of {list(ASSISTANT_PART_TYPES)}, "text": str}}')
        special = self._special_ids
        text_ids = self.encode(part["text"])
        if part["type"] == "text":
            add(text_ids, 1)
        elif part["type"] == "python":
            # The assistant writes the whole tool call, delimiters included: it must learn when to call.
            add([special["<|python_start|>"]] + text_ids + [special["<|python_end|>"]], 1)
        else:
            # The python tool writes its output at run time, so the model is never trained to produce it.
            add([special["<|output_start|>"]] + text_ids + [special["<|output_end|>"]], 0)

    def visualize_tokenization(self, ids: list[int], mask: list[int], with_token_id: bool = False) -> str:
        """Tokens joined by '|', green where mask is 1 (trained) and red where 0, for debugging."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)}); pass the pair "
                             "that render_conversation returned")
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        shown = []
        for token_id, trained in zip(ids, mask, strict=True):
            color = green if trained else red
            suffix = f"{gray}({token_id}){reset}" if with_token_id else ""
            shown.append(f"{color}{self.id_to_token(token_id)}{reset}{suffix}")
        return "|".join(shown)


class _EncodingPieces:
    """Stands in for tiktoken.Encoding while unpickling: keeps the state the pickle holds (its
    name, pattern, merges and special tokens) without running tiktoken's own code on it."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a pickled Encoding holds {type(state).__name__}, not its pieces "
                                         "(an encoding registered with tiktoken by name is not a nanochat tokenizer)")
        self.state = state


class _PiecesUnpickler(pickle.Unpickler):
    """Admits plain data and tiktoken's Encoding (as _EncodingPieces), no other class."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingPieces
        raise pickle.UnpicklingError(f"the file names {module}.{name}; a tokenizer.pkl may hold only a "
                                     "tiktoken Encoding or plain data")


def _build_encoding(pattern: str, mergeable_ranks: dict[bytes, int],
                    special_tokens: dict[str, int] | None = None) -> tiktoken.Encoding:
    if special_tokens is None:
        special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


def _messages_of(conversation) -> list[dict]:
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list) \
            or not conversation["messages"]:
        raise ValueError('a conversation must be a dict {"messages": [{"role": ..., "content": ...}, ...]} '
                         "with at least one message")
    for i, message in enumerate(conversation["messages"]):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] is {message!r}; each message must be a dict with 'role' and 'content'")
    return conversation["messages"]


def _merged_messages(conversation) -> list[tuple[int, dict]]:
    """(original index, message) pairs with a leading system message folded into the first user
    message (the model has no system role of its own), roles checked to alternate user/assistant."""
    messages = _messages_of(conversation)
    indexed = list(enumerate(messages))
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user" \
                or not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
            raise ValueError("a system message (messages[0]) must be a string followed by a user message "
                             "with string content, messages[1], into which it is merged")
        merged_user = copy.copy(messages[1])
        merged_user["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        indexed = [(1, merged_user)] + indexed[2:]
    for turn, (index, message) in enumerate(indexed):
        expected = "user" if turn % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"messages[{index}] has role {message['role']!r} but the expected role there is "
                             f"{expected!r}: after an optional system message, roles must alternate "
                             f"user, assistant, user, ... (known roles: {list(ROLES)})")
    return indexed


# --------------------------------------------------------------------------------------------
# The project's tokenizer under the base directory


def get_tokenizer_dir() -> str:
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer() -> Tokenizer:
    """The tokenizer that tok_train saved under <base>/tokenizer."""
    tokenizer_dir = get_tokenizer_dir()
    if not os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}: run python -m ray_jobs.tok_train first "
                                "(or set NANOCHAT_BASE_DIR to the base directory that has one)")
    return Tokenizer.from_directory(tokenizer_dir)


def compute_token_bytes(tokenizer: Tokenizer) -> "torch.Tensor":
    """int32 tensor: the UTF-8 byte length of every token id, 0 for the special tokens.

    Summing it over the targets turns a loss in nats per token into bits per byte, a number that
    does not depend on the vocabulary and so compares models with different tokenizers.
    Lengths come from the token's raw bytes, so tokens that split a multi-byte character count right.
    """
    import torch

    encoding = tokenizer.encoding
    special_ids = set(encoding._special_tokens.values())
    lengths = [0 if token_id in special_ids else len(encoding.decode_single_token_bytes(token_id))
               for token_id in range(tokenizer.get_vocab_size())]
    return torch.tensor(lengths, dtype=torch.int32)


def save_token_bytes(token_bytes: "torch.Tensor", tokenizer_dir: str) -> str:
    """Write token_bytes.pt into `tokenizer_dir` atomically; returns the file's path."""
    from nanochat.common import atomic_torch_save

    path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)
    atomic_torch_save(token_bytes, path)
    return path


def get_token_bytes(device="cpu") -> "torch.Tensor":
    """The token_bytes.pt that tok_train saved under <base>/tokenizer, on `device`."""
    import torch

    path = os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token byte lengths at {path}: run python -m ray_jobs.tok_train first")
    return torch.load(path, map_location=device)
