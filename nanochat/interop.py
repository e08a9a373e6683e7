"""Reading and writing karpathy/nanochat's checkpoints, so its models run here and ours run there.

nanochat's checkpoint manager writes, per model, a folder with

    model_<step:06d>.pt            the model's state dict (wte and value embeddings often in bf16)
    meta_<step:06d>.json           {"model_config": {...}, "step": ..., "user_config": {...}, ...}
    optim_<step:06d>_rank<r>.pt    rank r's shard of its MuonAdamW state (optional)

and keeps the tokenizer apart, in <base>/tokenizer (tokenizer.pkl, a pickled tiktoken Encoding,
and token_bytes.pt). A model published on Hugging Face is one folder with all of these files.

The parameter names are the same as ours. What differs is the architecture over time, which
nanochat's meta does not record; it is told from the keys (as nanochat's own loader does), and
each generation's constants follow from which keys there are:

    smear_gate present          current: QK gain 1.2, RoPE base 1e5, value gate over 12 channels
                                in (0, 3), short window a quarter of the context rounded up to 128
    value gate over 12 channels before smear/backout: QK gain 1.15, short window a third
    value gate over 32 channels QK gain 1, RoPE base 1e4, gate in (0, 2), short window a half
    no value embeddings         as above, without them; with no resid_lambdas/x0_lambdas those
                                are 1 and 0 (no effect), with no window_pattern every layer is full

Tensors from elsewhere are read with torch.load(weights_only=True) and everything is checked
(files, meta, keys, shapes, the tokenizer's vocabulary) before anything is written.
"""

import dataclasses
import json
import os
import re

import torch

from nanochat.checkpoint import CheckpointError
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer, compute_token_bytes

_MODEL_FILE = re.compile(r"^model_(\d+)\.pt$")
_COMPILE_PREFIX = "_orig_mod."
# The fields of nanochat's GPTConfig, the only ones its meta holds and its loader accepts.
REFERENCE_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                           "window_pattern")
# The constants of each generation of nanochat's architecture, by the keys that tell it apart.
CURRENT = dict(smear=True, backout=True, value_embeds=True, ve_gate_channels=12, ve_gate_range=3.0, qk_gain=1.2,
               rope_base=100000.0, short_window_divisor=4, window_multiple=128)
GATE12 = dict(CURRENT, smear=False, backout=False, qk_gain=1.15, short_window_divisor=3)
GATE32 = dict(GATE12, ve_gate_channels=32, ve_gate_range=2.0, qk_gain=1.0, rope_base=10000.0,
              short_window_divisor=2, window_multiple=1)
NO_VALUE_EMBEDS = dict(GATE32, value_embeds=False)
GENERATIONS = {"current": CURRENT, "value gate over 12 channels": GATE12, "value gate over 32 channels": GATE32,
               "no value embeddings": NO_VALUE_EMBEDS}


@dataclasses.dataclass
class ReferenceCheckpoint:
    """One step of a nanochat checkpoint, read and converted: `state` fits GPT(config) exactly."""

    step: int
    config: GPTConfig
    state: dict
    meta: dict
    optimizer_state: dict | None  # our MuonAdamW's state dict for one rank, or None
    tokenizer: Tokenizer
    tokenizer_files: dict[str, bytes]  # tokenizer.pkl and token_bytes.pt as they will be saved
    notes: list[str]


def _load_tensors(path: str, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a {what} by torch.load ({type(exc).__name__}: "
                              f"{exc}): the file is truncated or corrupted; download or copy it again") from exc


def find_reference_step(folder: str, step: int | None = None) -> int:
    """The step to import from `folder`: `step`, or the largest one with a model_<step>.pt."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder: pass the folder that holds model_<step>.pt and "
                              "meta_<step>.json")
    steps = sorted(int(m.group(1)) for m in map(_MODEL_FILE.match, os.listdir(folder)) if m)
    if not steps:
        raise CheckpointError(f"{folder} is not a nanochat checkpoint folder: it holds no model_<step>.pt (a "
                              "folder written by nanochat's checkpoint manager, or a downloaded model folder, has "
                              "model_<step>.pt and meta_<step>.json)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{folder} has no model_{step:06d}.pt; steps available: {steps}")
    return step


def find_tokenizer_dir(folder: str, tokenizer_dir: str | None = None) -> str:
    """Where the tokenizer of the checkpoint in `folder` is: `tokenizer_dir` when given, else the
    folder itself (a downloaded model), else nanochat's <base>/tokenizer two levels up."""
    candidates = [tokenizer_dir] if tokenizer_dir else [
        folder, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(folder))), "tokenizer")]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, TOKENIZER_FILE)):
            return candidate
    raise CheckpointError(f"no {TOKENIZER_FILE} in {' or '.join(candidates)}: pass the folder holding nanochat's "
                          f"{TOKENIZER_FILE} and {TOKEN_BYTES_FILE} with --tokenizer-dir")


def read_reference_meta(folder: str, step: int) -> dict:
    path = os.path.join(folder, f"meta_{step:06d}.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: nanochat writes the meta beside model_{step:06d}.pt, and its "
                              "model_config is needed to build the model; copy it along")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): copy it again") from exc
    config = meta.get("model_config") if isinstance(meta, dict) else None
    missing = [name for name in REFERENCE_CONFIG_FIELDS[:-1] if not isinstance(config, dict) or name not in config]
    if missing:
        raise CheckpointError(f"{path} lacks model_config fields {missing}: it is not a nanochat checkpoint meta")
    return meta


def reference_architecture(model_config: dict, state: dict) -> tuple[dict, str]:
    """Our GPTConfig fields for a nanochat model (its meta's model_config and its weights' keys),
    and the name of its generation."""
    if "smear_gate.weight" in state:
        name = "current"
    else:
        gates = [value for key, value in state.items() if key.endswith(".attn.ve_gate.weight")]
        if not any(key.startswith("value_embeds.") for key in state):
            name = "no value embeddings"
        elif gates and gates[0].size(1) == 12:
            name = "value gate over 12 channels"
        else:
            name = "value gate over 32 channels"
    fields = {key: model_config[key] for key in REFERENCE_CONFIG_FIELDS if key in model_config}
    fields.setdefault("window_pattern", "L")  # before sliding windows every layer saw the full context
    return {**fields, **GENERATIONS[name]}, name


def _convert_state(raw: dict, config: GPTConfig, model_path: str, notes: list[str]) -> dict:
    """nanochat's state dict as ours: plain names, fp32, padded vocabulary, lambdas filled in."""
    state = {key.removeprefix(_COMPILE_PREFIX): value.float() if value.is_floating_point() else value
             for key, value in raw.items()}
    if "resid_lambdas" not in state:
        state["resid_lambdas"] = torch.ones(config.n_layer)
        state["x0_lambdas"] = torch.zeros(config.n_layer)
        notes.append("the checkpoint predates resid_lambdas/x0_lambdas: set to 1 and 0, which leaves the model "
                     "as it was")
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    for key in ("transformer.wte.weight", "lm_head.weight", *[k for k in expected if k.startswith("value_embeds.")]):
        # Before nanochat padded its vocabulary, these tables had exactly vocab_size rows.
        if key in state and state[key].size(0) < expected[key].size(0):
            padding = state[key].new_zeros(expected[key].size(0) - state[key].size(0), state[key].size(1))
            state[key] = torch.cat([state[key], padding])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
             if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"the weights in {model_path} do not fit the model_config in its meta: missing "
                              f"{missing}, unexpected {unexpected}, wrong shape {wrong}")
    return state


def reference_param_order(model: GPT) -> list[list[str]]:
    """The parameter names of each group of nanochat's MuonAdamW, in its order: AdamW groups for
    the lm_head, wte, value embeddings, resid and x0 lambdas, smear/backout, then one Muon group
    per matrix shape (shapes sorted)."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [["lm_head.weight"], ["transformer.wte.weight"],
              [names[id(p)] for p in model.value_embeds.parameters()], ["resid_lambdas"], ["x0_lambdas"]]
    if model.smear_gate is not None:
        groups.append(["smear_gate.weight", "smear_lambda", "backout_lambda"])
    matrices = list(model.transformer.h.parameters())
    for shape in sorted({p.shape for p in matrices}):
        groups.append([names[id(p)] for p in matrices if p.shape == shape])
    return groups


def _merge_shards(shards: list[dict], model: GPT) -> dict[str, dict]:
    """Per parameter name, the full optimizer state held across nanochat's rank shards.

    AdamW: parameters of 1024 elements or more are split by rows across ranks, smaller ones are
    replicated. Muon: the state of a group lives on its first parameter, stacked over the group's
    parameters and split in chunks of ceil(K / ranks) across ranks."""
    order = reference_param_order(model)
    params = dict(model.named_parameters())
    world = len(shards)
    for shard in shards:
        groups = shard.get("param_groups") if isinstance(shard, dict) else None
        if not isinstance(groups, list) or [len(g.get("params", [])) for g in groups] != [len(g) for g in order]:
            raise ValueError("its parameter groups are not those of nanochat's MuonAdamW for this model")
    merged = {}
    index = 0
    for group, names in zip(shards[0]["param_groups"], order):
        ids = list(range(index, index + len(names)))
        index += len(names)
        if group.get("kind") == "muon":
            states = [shard["state"].get(ids[0]) for shard in shards]
            if any(state is None for state in states):
                continue  # the group never stepped
            momentum = torch.cat([s["momentum_buffer"] for s in states])[:len(names)]
            second = torch.cat([s["second_momentum_buffer"] for s in states])[:len(names)]
            for k, name in enumerate(names):
                merged[name] = {"momentum_buffer": momentum[k].float().clone(),
                                "second_momentum_buffer": second[k].float().clone()}
            continue
        for idx, name in zip(ids, names):
            states = [shard["state"].get(idx) for shard in shards]
            if any(state is None for state in states):
                continue
            if world > 1 and params[name].numel() >= 1024:
                pieces = {key: torch.cat([s[key] for s in states]) for key in ("exp_avg", "exp_avg_sq")}
            else:
                pieces = {key: states[0][key] for key in ("exp_avg", "exp_avg_sq")}
            step = states[0]["step"]
            merged[name] = {"step": int(step.item() if isinstance(step, torch.Tensor) else step),
                            **{key: value.float().clone() for key, value in pieces.items()}}
    return merged


def _import_optimizer(folder: str, step: int, model: GPT, notes: list[str]) -> dict | None:
    """Our single-rank optimizer state from nanochat's shards of `step`, or None (with a note why)."""
    paths = sorted((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                   if (m := re.match(rf"^optim_{step:06d}_rank(\d+)\.pt$", name)))
    if not paths:
        notes.append("no optimizer shards (optim_*_rank*.pt) in the checkpoint: training continues with a fresh "
                     "optimizer")
        return None
    ranks = [rank for rank, _ in paths]
    if ranks != list(range(len(ranks))):
        notes.append(f"optimizer shards of ranks {ranks} are not all of ranks 0..{max(ranks)}: training continues "
                     "with a fresh optimizer")
        return None
    shards = [_load_tensors(path, "nanochat optimizer shard") for _, path in paths]
    try:
        merged = _merge_shards(shards, model)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        notes.append(f"the optimizer shards are not in the layout this importer reads ({exc}): training continues "
                     "with a fresh optimizer")
        return None
    optimizer = model.setup_optimizer()
    params = dict(model.named_parameters())
    for name, state in merged.items():
        optimizer.state[params[name]] = state
    notes.append(f"optimizer state imported from {len(paths)} rank shard(s), saved for a 1-rank run")
    return optimizer.state_dict()


def read_reference_checkpoint(folder: str, step: int | None = None,
                              tokenizer_dir: str | None = None) -> ReferenceCheckpoint:
    """Read and check one step of a nanochat checkpoint folder (see the module docstring)."""
    step = find_reference_step(folder, step)
    meta = read_reference_meta(folder, step)
    tokenizer_dir = find_tokenizer_dir(folder, tokenizer_dir)
    tokenizer_path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
    try:
        tokenizer = Tokenizer.from_directory(tokenizer_dir)
    except ValueError as exc:
        raise CheckpointError(f"{tokenizer_path}: {exc}") from exc
    with open(tokenizer_path, "rb") as f:
        tokenizer_files = {TOKENIZER_FILE: f.read()}
    notes = []
    token_bytes_path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)
    if os.path.isfile(token_bytes_path):
        token_bytes = _load_tensors(token_bytes_path, "token byte table")
        if not isinstance(token_bytes, torch.Tensor) or token_bytes.shape != (tokenizer.get_vocab_size(),):
            raise CheckpointError(f"{token_bytes_path} does not hold one byte count per token of {tokenizer_path} "
                                  f"({tokenizer.get_vocab_size()} tokens)")
        with open(token_bytes_path, "rb") as f:
            tokenizer_files[TOKEN_BYTES_FILE] = f.read()
    else:
        notes.append(f"no {TOKEN_BYTES_FILE} beside {tokenizer_path}: computed from the tokenizer")
        tokenizer_files[TOKEN_BYTES_FILE] = None

    model_path = os.path.join(folder, f"model_{step:06d}.pt")
    raw = _load_tensors(model_path, "nanochat model state dict")
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{model_path} does not hold a state dict of tensors: it is not a nanochat model file")
    plain = {key.removeprefix(_COMPILE_PREFIX): value for key, value in raw.items()}
    fields, generation = reference_architecture(meta["model_config"], plain)
    meta_path = os.path.join(folder, f"meta_{step:06d}.json")
    if fields["vocab_size"] != tokenizer.get_vocab_size():
        raise CheckpointError(f"the vocab_size {fields['vocab_size']} in {meta_path} disagrees with the "
                              f"{tokenizer.get_vocab_size()} tokens of {tokenizer_path}: pass the tokenizer the model "
                              "was trained with (--tokenizer-dir)")
    try:
        config = GPTConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the model_config in {meta_path} is not a valid model ({exc})") from exc
    notes.insert(0, f"architecture: nanochat's {generation} generation")
    state = _convert_state(raw, config, model_path, notes)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    optimizer_state = _import_optimizer(folder, step, model, notes)
    return ReferenceCheckpoint(step=step, config=config, state=state, meta=meta, optimizer_state=optimizer_state,
                               tokenizer=tokenizer, tokenizer_files=tokenizer_files, notes=notes)


def write_tokenizer_files(checkpoint: ReferenceCheckpoint, tokenizer_dir: str) -> None:
    """The checkpoint's tokenizer.pkl as it came, and its token_bytes.pt (computed when it had none)."""
    os.makedirs(tokenizer_dir, exist_ok=True)
    with open(os.path.join(tokenizer_dir, TOKENIZER_FILE), "wb") as f:
        f.write(checkpoint.tokenizer_files[TOKENIZER_FILE])
    token_bytes = checkpoint.tokenizer_files[TOKEN_BYTES_FILE]
    if token_bytes is None:
        torch.save(compute_token_bytes(checkpoint.tokenizer), os.path.join(tokenizer_dir, TOKEN_BYTES_FILE))
    else:
        with open(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), "wb") as f:
            f.write(token_bytes)


def reference_generation(config: GPTConfig) -> str:
    """The nanochat generation whose code runs a model of `config` as we do; CheckpointError when
    none does (our models from before smear/backout, or with windows nanochat cannot express)."""
    fields = dataclasses.asdict(config)
    for name, constants in GENERATIONS.items():
        if all(fields[key] == value for key, value in constants.items() if key != "window_multiple"):
            with torch.device("meta"):
                ours = GPT(config).window_sizes
                theirs = GPT(dataclasses.replace(config, window_multiple=constants["window_multiple"])).window_sizes
            if ours == theirs:
                return name
    raise CheckpointError(f"no version of karpathy/nanochat builds this model ({config}): it needs smear and "
                          "backout, value embeddings with a gate over 12 channels, and short windows that nanochat's "
                          "rounding (a quarter of the context, rounded up to 128) gives")


def reference_meta(config: GPTConfig, step: int, meta: dict) -> dict:
    """A meta_<step>.json for nanochat's loader: its model_config fields, the step, and what of
    ours it has a place for."""
    record = {"step": step, "model_config": {key: getattr(config, key) for key in REFERENCE_CONFIG_FIELDS},
              "user_config": meta.get("user_config", {})}
    for key in ("val_bpb", "device_batch_size", "max_seq_len", "total_batch_size"):
        if key in meta:
            record[key] = meta[key]
    return record
