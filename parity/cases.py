"""Declarative parity cases (TOML): which model, which requests, which engine settings, which tolerances.

    name = "tiny"
    [model]
    preset = "tiny"            # tiny | flash | pro
    seed = 0                   # synthetic weights and prompt tokens
    init = "chaotic"           # synthetic weight distribution: chaotic | calm (docs/synthetic_weights.md)
    overrides = {}             # any ModelArgs field, e.g. { revision = "initial" }
    checkpoint = "DIR"         # instead of preset: an official-format checkpoint (its config is the model)
    stream = false             # layer-streamed weights: one block in memory at a time (parity.stream)
    layers = [0, 2, 3]         # a model made of these layers of the checkpoint (SWA, CSA, HCA kept as they are)
    [[requests]]
    prompt_len = 150
    decode_steps = 8
    [engine]                   # settings of the optimized runtime
    chunk_size = 64            # prefill chunk per request per step
    token_budget = 256         # tokens per engine step
    mtp_draft = 1              # MTP draft tokens per decode step (0 = off; > 1 chains the MTP block)
    block_size = 16            # compressed entries per KV block
    num_blocks = 0             # blocks per compress ratio; 0 = what the requests need
    decode_exact_chunks = true # chunks after a context compute like decodes: the verdict is then bitwise
    [tolerance]                # when not decode-exact (decode-exact cases are judged bitwise)
    calibration = "batched.noise.json"  # noise thresholds from `parity calibrate`, relative to the case file

A top-level `candidate = "transformers"` judges HF transformers' DeepSeek-V4 port instead of the optimized engine
(`parity.engines`, docs/engines.md); `quant_sim_off = ["kv", "indexer"]` (its default) names the reference's
quantization simulations turned off for it, since HF simulates neither (`parity.engines.quant`).

Built-in cases live in `parity/builtin_cases/`; `load_case(name_or_path)` accepts either.
"""

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from parity.checkpoint import Checkpoint
from parity.checkpoint.subset import check_layers, subset_args
from parity.checkpoint.synth import INITS
from parity.config import ModelArgs
from parity.errors import ParityError

BUILTIN_DIR = Path(__file__).parent / "builtin_cases"
DEFAULT_CASE = "tiny"
# the implementations a case may judge (`parity.engines`) and the reference's quantization simulations a case may
# turn off for a candidate that does not simulate them (`parity.engines.quant`)
CANDIDATES = ("optimized", "transformers")
QUANT_SWITCHES = ("kv", "indexer")


@dataclass(frozen=True)
class RequestSpec:
    prompt_len: int
    decode_steps: int


@dataclass(frozen=True)
class EngineSpec:
    chunk_size: int = 64
    token_budget: int = 256
    mtp_draft: int = 1
    block_size: int = 16
    num_blocks: int = 0
    decode_exact_chunks: bool = True


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    seed: int
    requests: tuple[RequestSpec, ...]
    init: str = "chaotic"
    overrides: tuple[tuple[str, object], ...] = ()
    engine: EngineSpec = field(default_factory=EngineSpec)
    calibration: Path | None = None  # noise thresholds (`parity calibrate`); None = the stated defaults
    description: str = ""
    source: str = "<builtin>"
    candidate: str = "optimized"
    quant_sim_off: tuple[str, ...] = ()
    checkpoint: Path | None = None  # [model] checkpoint: an official-format dir; the model is then its config
    stream: bool = False  # [model] stream: layer-streamed weights, one block in memory at a time (parity.stream)
    layers: tuple[int, ...] | None = None  # [model] layers: run a model made of these layers (checkpoint.subset)

    def model_args(self) -> ModelArgs:
        """The model the runs see: the full model, or the one made of `layers` of it."""
        full = self.full_args()
        return subset_args(full, self.layers) if self.layers is not None else full

    def full_args(self) -> ModelArgs:
        """The model of the checkpoint (given, or written for the case) before any `layers` selection."""
        if self.checkpoint is not None:
            # the case names a real model: its config is the model
            return Checkpoint(self.checkpoint).args.with_(dict(self.overrides), source=f"{self.source}: [model]")
        return ModelArgs.preset(self.preset, **dict(self.overrides))

    def streamed(self) -> "Case":
        """This case with layer-streamed weights (`parity run --stream`)."""
        return replace(self, stream=True)

    def blocks_needed(self) -> int:
        """KV blocks per compress-ratio pool that all requests need together (what `engine.num_blocks = 0` gives):
        each request's prompt, decodes, MTP drafts and the one token a step may look ahead."""
        from parity.optimized.cache import PagedCache

        args, e = self.model_args(), self.engine
        lengths = (r.prompt_len + r.decode_steps + e.mtp_draft + 1 for r in self.requests)
        return sum(PagedCache.blocks_for(args, n, e.block_size) for n in lengths)

    def prompts(self, vocab_size: int) -> list[torch.Tensor]:
        """Deterministic prompt token ids, one 1-D int64 tensor per request."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return [torch.randint(0, vocab_size, (r.prompt_len,), generator=g) for r in self.requests]


def _table(d: dict, key: str, source: str) -> dict:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise ParityError(f"{source}: [{key}] must be a table")
    return value


def _check_keys(d: dict, allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ParityError(f"{source}: unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


# torch generators take seeds below 2**64; the prompts use seed + 1
MAX_SEED = 2**63 - 2


def _int(d: dict, key: str, where: str, source: str, default=None, minimum: int = 0, maximum: int | None = None) -> int:
    value = d.get(key, default)
    if value is None:
        raise ParityError(f"{source}: {where}.{key} is required")
    bad = not isinstance(value, int) or isinstance(value, bool) or value < minimum
    if bad or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ParityError(f"{source}: {where}.{key} must be an integer {bound}, got {value!r}")
    return value


def _str(d: dict, key: str, where: str, source: str, default: str) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ParityError(f"{source}: {where}{key} must be a string, got {value!r}")
    return value


def parse_case(data: dict, source: str) -> Case:
    allowed = {"name", "description", "model", "requests", "engine", "tolerance", "candidate", "quant_sim_off"}
    _check_keys(data, allowed, "the case", source)
    model = _table(data, "model", source)
    _check_keys(model, {"preset", "seed", "init", "overrides", "checkpoint", "stream", "layers"}, "[model]", source)
    init = model.get("init", "chaotic")
    if init not in INITS:
        raise ParityError(f"{source}: model.init must be one of {list(INITS)}, got {init!r}")
    overrides = model.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ParityError(f"{source}: model.overrides must be a table of ModelArgs fields")
    requests = data.get("requests")
    if not isinstance(requests, list) or not requests:
        raise ParityError(f"{source}: needs at least one [[requests]] entry")
    specs = []
    for i, r in enumerate(requests):
        where = f"requests[{i}]"
        if not isinstance(r, dict):
            raise ParityError(f"{source}: {where} must be a table")
        _check_keys(r, {"prompt_len", "decode_steps"}, where, source)
        prompt_len = _int(r, "prompt_len", where, source, minimum=1)
        specs.append(RequestSpec(prompt_len, _int(r, "decode_steps", where, source)))
    engine = _table(data, "engine", source)
    _check_keys(engine, {f.name for f in fields(EngineSpec)}, "[engine]", source)
    defaults = EngineSpec()
    exact = engine.get("decode_exact_chunks", defaults.decode_exact_chunks)
    if not isinstance(exact, bool):
        raise ParityError(f"{source}: engine.decode_exact_chunks must be true or false, got {exact!r}")
    engine_spec = EngineSpec(
        chunk_size=_int(engine, "chunk_size", "engine", source, defaults.chunk_size, minimum=1),
        token_budget=_int(engine, "token_budget", "engine", source, defaults.token_budget, minimum=1),
        mtp_draft=_int(engine, "mtp_draft", "engine", source, defaults.mtp_draft),
        block_size=_int(engine, "block_size", "engine", source, defaults.block_size, minimum=1),
        num_blocks=_int(engine, "num_blocks", "engine", source, defaults.num_blocks),
        decode_exact_chunks=exact,
    )
    tolerance = _table(data, "tolerance", source)
    _check_keys(tolerance, {"calibration"}, "[tolerance]", source)
    calibration = tolerance.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, str) or not calibration:
            raise ParityError(f"{source}: tolerance.calibration must be a file name, got {calibration!r}")
        calibration = Path(source).parent / calibration if source != "<builtin>" else BUILTIN_DIR / calibration
        if not calibration.is_file():
            raise ParityError(f"{source}: tolerance.calibration: no such file {str(calibration)!r}")
        from parity.compare.thresholds import NoiseModel  # light: errors and io only

        try:  # read now, also for a decode-exact case (judged bitwise) that never uses it: a broken file is refused
            NoiseModel.load(calibration)
        except ParityError as e:
            raise ParityError(f"{source}: tolerance.calibration: {e}") from None
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ParityError(f"{source}: 'name' must be a non-empty string usable as a dir name, got {name!r}")
    case = Case(
        name=name,
        preset=_str(model, "preset", "model.", source, "tiny"),
        seed=_int(model, "seed", "model", source, 0, maximum=MAX_SEED),
        init=init,
        requests=tuple(specs),
        overrides=tuple(sorted(overrides.items())),
        engine=engine_spec,
        calibration=calibration,
        description=_str(data, "description", "", source, ""),
        source=source,
        **_candidate(data, engine_spec, source),
        **_model_source(model, source),
    )
    try:
        args = case.full_args()  # validates preset and overrides, naming the key
    except ParityError as e:
        raise ParityError(f"{source}: [model] {e}") from None
    if "layers" in model:
        case = replace(case, layers=check_layers(model["layers"], args.n_layers, f"{source}: model.layers"))
        args = case.model_args()
    if engine_spec.mtp_draft and not args.n_mtp_layers:
        raise ParityError(
            f"{source}: engine.mtp_draft must be 0 when the model has no MTP layer, got {engine_spec.mtp_draft}"
        )
    for i, r in enumerate(specs):
        need = r.prompt_len + r.decode_steps + engine_spec.mtp_draft + 1
        if need > args.max_seq_len:
            raise ParityError(
                f"{source}: requests[{i}] needs {need} positions (prompt_len + decode_steps + engine.mtp_draft + 1), "
                f"more than the model's max_seq_len={args.max_seq_len}"
            )
    if engine_spec.block_size > args.max_seq_len:
        raise ParityError(
            f"{source}: engine.block_size = {engine_spec.block_size} is more than the model's max_seq_len="
            f"{args.max_seq_len} (a block holds compressed entries of one sequence)"
        )
    room = max(len(specs), args.max_batch_size) * args.max_seq_len
    if engine_spec.num_blocks * engine_spec.block_size > room:
        raise ParityError(
            f"{source}: engine.num_blocks = {engine_spec.num_blocks} blocks of {engine_spec.block_size} entries is "
            f"more than the {room} positions its sequences can hold (max_seq_len x slots); 0 = what the requests need"
        )
    need = case.blocks_needed()
    if engine_spec.num_blocks and engine_spec.num_blocks < need:
        raise ParityError(
            f"{source}: engine.num_blocks = {engine_spec.num_blocks} is fewer than the {need} KV blocks the requests "
            f"need at block_size {engine_spec.block_size} (0 = exactly what they need)"
        )
    return case


def _candidate(data: dict, engine: EngineSpec, source: str) -> dict:
    """`candidate` and `quant_sim_off`, each refused with one line naming the key and the valid values."""
    candidate = data.get("candidate", "optimized")
    if candidate not in CANDIDATES:
        raise ParityError(f"{source}: candidate must be one of {list(CANDIDATES)}, got {candidate!r}")
    default = list(QUANT_SWITCHES) if candidate != "optimized" else []
    off = data.get("quant_sim_off", default)
    if not isinstance(off, list) or any(s not in QUANT_SWITCHES for s in off):
        raise ParityError(f"{source}: quant_sim_off must be a list of {list(QUANT_SWITCHES)}, got {off!r}")
    if off and candidate == "optimized":
        raise ParityError(f"{source}: quant_sim_off is for other candidates; the optimized engine simulates both")
    if candidate != "optimized" and engine.mtp_draft:
        raise ParityError(
            f"{source}: engine.mtp_draft must be 0 for candidate {candidate!r} (no MTP module), got {engine.mtp_draft}"
        )
    return {"candidate": candidate, "quant_sim_off": tuple(off)}


def _model_source(model: dict, source: str) -> dict:
    """`[model] checkpoint` (a dir, relative to the case file; exclusive with `preset`) and `[model] stream`, each
    refused with one line naming the key."""
    stream = model.get("stream", False)
    if not isinstance(stream, bool):
        raise ParityError(f"{source}: model.stream must be true or false, got {stream!r}")
    ckpt = model.get("checkpoint")
    if ckpt is None:
        return {"stream": stream}
    if not isinstance(ckpt, str) or not ckpt:
        raise ParityError(f"{source}: model.checkpoint must be a directory name, got {ckpt!r}")
    if "preset" in model:
        raise ParityError(
            f"{source}: model.checkpoint and model.preset are exclusive: the checkpoint's config is the model"
        )
    path = Path(source).parent / ckpt if source != "<builtin>" else Path(ckpt)
    try:
        Checkpoint(path)  # index and configs readable: refused now, not after minutes of work
    except ParityError as e:
        raise ParityError(f"{source}: model.checkpoint: {e}") from None
    return {"stream": stream, "checkpoint": path}


def load_case(name_or_path: str | None = None) -> Case:
    """A built-in case by name (default: "tiny") or a TOML file path."""
    name_or_path = name_or_path or DEFAULT_CASE
    path = Path(name_or_path)
    if not path.suffix and not path.is_file():  # a bare name is a built-in case unless such a file is here
        path = BUILTIN_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            available = sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))
            raise ParityError(f"unknown case {name_or_path!r}; built-in cases: {available} (or give a .toml path)")
    if not path.exists():
        raise ParityError(f"{path}: no such case file")
    if not path.is_file():
        raise ParityError(f"{path}: not a file (expected a .toml case)")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ParityError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ParityError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ParityError(f"{path}: invalid TOML ({e})") from None
    return parse_case(data, str(path))
