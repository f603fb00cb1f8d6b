"""Hugging Face checkpoints: config.json and safetensors weights <-> our ModelConfig and params.

Families: GPT-2 (`gpt2`: learned positions, LayerNorm, tanh GELU, biases, Conv1D `[in, out]` weights
with q/k/v fused in `c_attn`), and the Llama-like `llama` (Llama 3's rotary scaling included),
`mistral` (without a sliding window) and `qwen2` (biases on q/k/v only), whose `nn.Linear` weights
are `[out, in]`. Our kernels keep their multi-axis shapes (`lm.model.Linear`): a weight is
transposed where HF's is `[out, in]`, then reshaped. Config keys are read as transformers 4.x writes
them (`rope_theta`, `rope_scaling`) and as 5.x does (`rope_parameters`); a key missing from a
config.json takes its family's default, as transformers does. What our model cannot represent is a
ConfigError naming the field. Weights are read and written with the safetensors numpy API.
"""

import json
import os

import numpy as np

from lm.errors import ConfigError, DataError
from lm.model import ModelConfig

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Keys a config.json may leave out (transformers writes only what differs from the base config).
_DEFAULTS = {
    "gpt2": {
        "tie_word_embeddings": True,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "n_inner": None,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    },
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "mistral": {"tie_word_embeddings": False, "sliding_window": 4096},
    "qwen2": {"tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096},
}
_LLAMA_LIKE_DEFAULTS = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "num_key_value_heads": None,
    "head_dim": None,
}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_BUFFERS = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")  # non-parameters old files hold


def _bad(field: str, value, expected: str) -> ConfigError:
    return ConfigError(f"Hugging Face config {field}={value!r}: {expected}")


def _getter(hf: dict, family: str):
    """`get(key)`: hf[key], else the family's default, else a ConfigError naming the missing key."""
    defaults = {**(_LLAMA_LIKE_DEFAULTS if family != "gpt2" else {}), **_DEFAULTS[family]}

    def get(key):
        if key in hf:
            return hf[key]
        if key in defaults:
            return defaults[key]
        raise ConfigError(f"Hugging Face config has no {key!r} (needed for model_type {family!r})")

    return get


def _rope_fields(hf: dict, get) -> dict:
    """rope_theta and the rope_scaling fields from `rope_parameters` (5.x) or `rope_theta` and
    `rope_scaling` (4.x)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", get("rope_theta")))
    merged = {**scaling, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise _bad("partial_rotary_factor", merged["partial_rotary_factor"], "only 1.0 is supported")
    fields = {"rope_theta": float(theta)}
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise ConfigError(f"Hugging Face config rope_scaling has no {key!r} (rope_type 'llama3')")
        fields.update(
            rope_scaling="llama3",
            rope_factor=float(merged["factor"]),
            rope_low_freq_factor=float(merged["low_freq_factor"]),
            rope_high_freq_factor=float(merged["high_freq_factor"]),
            rope_original_max_len=int(merged["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise _bad("rope_type", kind, "expected 'default' or 'llama3'")
    return fields


def _gpt2_fields(get) -> dict:
    act = get("activation_function")
    if act not in _TANH_GELUS:
        raise _bad("activation_function", act, f"expected one of {', '.join(_TANH_GELUS)}")
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if bool(get(key)) != want:
            raise _bad(key, get(key), f"only {want} is supported")
    d = get("n_embd")
    return dict(
        vocab_size=get("vocab_size"),
        num_layers=get("n_layer"),
        num_heads=get("n_head"),
        d_model=d,
        d_ff=get("n_inner") or 4 * d,
        max_seq_len=get("n_positions"),
        positions="learned",
        norm="layernorm",
        mlp="gelu",
        use_bias=True,
        norm_eps=float(get("layer_norm_epsilon")),
        tie_embeddings=bool(get("tie_word_embeddings")),
    )


def _llama_like_fields(hf: dict, family: str, get) -> dict:
    if get("hidden_act") != "silu":
        raise _bad("hidden_act", get("hidden_act"), f"model_type {family!r} is supported with 'silu' only")
    max_len = get("max_position_embeddings")
    if family == "mistral" and get("sliding_window") is not None and get("sliding_window") < max_len:
        raise _bad(
            "sliding_window", get("sliding_window"), f"expected null or >= max_position_embeddings={max_len}"
        )
    if family == "qwen2" and get("use_sliding_window") and get("sliding_window") < max_len:
        raise _bad("use_sliding_window", True, "sliding-window attention is not supported")
    use_bias = False
    if family == "llama":
        if bool(get("attention_bias")) != bool(get("mlp_bias")):
            raise _bad("attention_bias", get("attention_bias"), f"must equal mlp_bias={get('mlp_bias')}")
        use_bias = bool(get("attention_bias"))
    d, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim")
    return dict(
        vocab_size=get("vocab_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads,
        head_dim=0 if head_dim in (None, d // heads) else head_dim,
        d_model=d,
        d_ff=get("intermediate_size"),
        max_seq_len=max_len,
        positions="rotary",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=use_bias,
        qkv_bias=family == "qwen2",
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")),
        **_rope_fields(hf, get),
    )


def model_fields(hf: dict) -> dict:
    """The `ModelConfig` fields (architecture only: no dtype, dropout or remat) of a Hugging Face
    config.json dict of model_type gpt2, llama, mistral or qwen2."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _bad("model_type", family, f"expected one of {', '.join(FAMILIES)}")
    get = _getter(hf, family)
    return _gpt2_fields(get) if family == "gpt2" else _llama_like_fields(hf, family, get)


def generation_ids(hf: dict) -> dict:
    """{bos_token_id, eos_token_id, pad_token_id: int or list of ints} of those a config sets."""
    return {k: hf[k] for k in GENERATION_KEYS if hf.get(k) is not None}


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face family that represents `cfg` (gpt2, llama or qwen2), else a ConfigError
    naming the first field that no family represents."""

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(
                f"config.model.{key}={getattr(cfg, key)!r}: no Hugging Face family has it ({why})"
            )

    need(cfg.kind == "transformer", "kind", "every family is a transformer")
    need(not cfg.bidirectional, "bidirectional", "every family is a causal decoder")
    need(cfg.type_vocab_size == 0, "type_vocab_size", "no family has token-type embeddings")
    need(cfg.prefix_length == 0, "prefix_length", "no family has learned prefixes")
    need(cfg.prompt_length == 0, "prompt_length", "no family has a soft prompt")
    if cfg.positions == "learned":
        need(cfg.norm == "layernorm", "norm", "learned positions go with layernorm in gpt2")
        need(cfg.mlp == "gelu", "mlp", "learned positions go with gelu in gpt2")
        need(cfg.use_bias, "use_bias", "gpt2 has biases")
        need(cfg.kv_heads == cfg.num_heads, "num_kv_heads", "gpt2 has no grouped-query attention")
        need(cfg.head_size * cfg.num_heads == cfg.d_model, "head_dim", "gpt2's is d_model // num_heads")
        return "gpt2"
    need(cfg.norm == "rmsnorm", "norm", "rotary positions go with rmsnorm in llama and qwen2")
    need(cfg.mlp == "swiglu", "mlp", "rotary positions go with swiglu in llama and qwen2")
    return "qwen2" if cfg.qkv_bias and not cfg.use_bias else "llama"


def hf_config(cfg: ModelConfig, ids: dict | None = None) -> dict:
    """The transformers config.json dict of `cfg`'s family (`family_of`), with generation ids `ids`."""
    family = family_of(cfg)
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    common.update(ids or {})
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **common,
        }
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
        rope_parameters.update(rope_scaling)
    out = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "attention_dropout": 0.0,
        **common,
    }
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    return out


def _tensors(cfg: ModelConfig, family: str) -> list:
    """Every HF tensor of `cfg` as (hf name, hf shape, transposed, [(our param path, our shape)]).

    A tensor's parts split its last axis (after the transpose of an `[out, in]` weight) in equal
    pieces, each reshaped to its parameter's shape: GPT-2's fused c_attn has three parts.
    """
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    h, kvh, hd = cfg.num_heads, cfg.kv_heads, cfg.head_size
    out = []

    def add(name, shape, transposed, *parts):
        out.append((name, tuple(shape), transposed, list(parts)))

    if family == "gpt2":
        add("transformer.wte.weight", (v, d), False, (("token_embed", "embedding"), (v, d)))
        add(
            "transformer.wpe.weight",
            (cfg.max_seq_len, d),
            False,
            (("pos_embed", "embedding"), (cfg.max_seq_len, d)),
        )
        for i in range(cfg.num_layers):
            p, L = f"transformer.h.{i}.", f"layers_{i}"
            for hf_norm, norm in (("ln_1", "ln_attn"), ("ln_2", "ln_mlp")):
                for kind, ours in (("weight", "scale"), ("bias", "bias")):
                    add(f"{p}{hf_norm}.{kind}", (d,), False, ((L, norm, ours), (d,)))
            qkv = [(L, "attn", n) for n in ("query", "key", "value")]
            add(f"{p}attn.c_attn.weight", (d, 3 * d), False, *[((*q, "kernel"), (d, h, hd)) for q in qkv])
            add(f"{p}attn.c_attn.bias", (3 * d,), False, *[((*q, "bias"), (h, hd)) for q in qkv])
            add(f"{p}attn.c_proj.weight", (d, d), False, ((L, "attn", "out", "kernel"), (h, hd, d)))
            add(f"{p}attn.c_proj.bias", (d,), False, ((L, "attn", "out", "bias"), (d,)))
            add(f"{p}mlp.c_fc.weight", (d, f), False, ((L, "mlp", "wi", "kernel"), (d, f)))
            add(f"{p}mlp.c_fc.bias", (f,), False, ((L, "mlp", "wi", "bias"), (f,)))
            add(f"{p}mlp.c_proj.weight", (f, d), False, ((L, "mlp", "wo", "kernel"), (f, d)))
            add(f"{p}mlp.c_proj.bias", (d,), False, ((L, "mlp", "wo", "bias"), (d,)))
        add("transformer.ln_f.weight", (d,), False, (("ln_final", "scale"), (d,)))
        add("transformer.ln_f.bias", (d,), False, (("ln_final", "bias"), (d,)))
    else:
        add("model.embed_tokens.weight", (v, d), False, (("token_embed", "embedding"), (v, d)))
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        for i in range(cfg.num_layers):
            p, L = f"model.layers.{i}.", f"layers_{i}"
            add(f"{p}input_layernorm.weight", (d,), False, ((L, "ln_attn", "scale"), (d,)))
            add(f"{p}post_attention_layernorm.weight", (d,), False, ((L, "ln_mlp", "scale"), (d,)))
            for hf_name, ours, heads in (
                ("q_proj", "query", h),
                ("k_proj", "key", kvh),
                ("v_proj", "value", kvh),
            ):
                add(
                    f"{p}self_attn.{hf_name}.weight",
                    (heads * hd, d),
                    True,
                    ((L, "attn", ours, "kernel"), (d, heads, hd)),
                )
                if qkv_bias:
                    add(
                        f"{p}self_attn.{hf_name}.bias",
                        (heads * hd,),
                        False,
                        ((L, "attn", ours, "bias"), (heads, hd)),
                    )
            add(f"{p}self_attn.o_proj.weight", (d, h * hd), True, ((L, "attn", "out", "kernel"), (h, hd, d)))
            linears = [
                ("mlp.gate_proj", "wi_gate", d, f),
                ("mlp.up_proj", "wi_up", d, f),
                ("mlp.down_proj", "wo", f, d),
            ]
            for hf_name, ours, n_in, n_out in linears:
                add(f"{p}{hf_name}.weight", (n_out, n_in), True, ((L, "mlp", ours, "kernel"), (n_in, n_out)))
            if cfg.use_bias:
                add(f"{p}self_attn.o_proj.bias", (d,), False, ((L, "attn", "out", "bias"), (d,)))
                for hf_name, ours, _, n_out in linears:
                    add(f"{p}{hf_name}.bias", (n_out,), False, ((L, "mlp", ours, "bias"), (n_out,)))
        add("model.norm.weight", (d,), False, (("ln_final", "scale"), (d,)))
    if not cfg.tie_embeddings:
        add("lm_head.weight", (v, d), True, (("lm_head", "kernel"), (d, v)))
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _canonical_names(state: dict, family: str) -> dict:
    """GPT-2 files saved from the base model name tensors without the 'transformer.' prefix."""
    if family == "gpt2" and "transformer.wte.weight" not in state and "wte.weight" in state:
        return {k if k.startswith("lm_head.") else f"transformer.{k}": x for k, x in state.items()}
    return state


def params_from_state_dict(
    state: dict, cfg: ModelConfig, family: str, source: str = "the checkpoint"
) -> dict:
    """Our nested params {'token_embed': {'embedding': [vocab, d_model]}, 'layers_0': ...} (numpy,
    cfg.param_dtype) from a Hugging Face state dict {name: numpy array} of `family`.

    A missing tensor, one of another shape, or an unknown one is a DataError naming it and `source`.
    """
    state = _canonical_names(state, family)
    dtype = np.dtype(cfg.params_dtype)
    params, used = {}, set()
    for name, shape, transposed, parts in _tensors(cfg, family):
        if name not in state:
            raise DataError(f"{source}: no tensor {name!r} (expected shape {list(shape)})")
        x = np.asarray(state[name])
        if tuple(x.shape) != shape:
            raise DataError(f"{source}: tensor {name!r} has shape {list(x.shape)}, expected {list(shape)}")
        used.add(name)
        x = x.T if transposed else x
        for (path, part_shape), piece in zip(parts, np.split(x, len(parts), axis=-1)):
            _set(params, path, np.ascontiguousarray(piece.reshape(part_shape).astype(dtype)))
    ignorable = lambda k: k.endswith(_BUFFERS) or (cfg.tie_embeddings and k == "lm_head.weight")
    extra = sorted(k for k in state if k not in used and not ignorable(k))
    if extra:
        raise DataError(f"{source}: tensor {extra[0]!r} has no place in a {family} model of this config")
    return params


def state_dict_from_params(params: dict, cfg: ModelConfig, family: str) -> dict:
    """The Hugging Face state dict {name: float32 numpy array} of our nested params (the inverse of
    `params_from_state_dict`)."""
    state = {}
    for name, shape, transposed, parts in _tensors(cfg, family):
        rows = shape[1] if transposed else shape[0]
        pieces = [np.asarray(_get(params, path), np.float32) for path, _ in parts]
        pieces = [p.reshape(rows, -1) if len(shape) == 2 else p.reshape(-1) for p in pieces]
        x = np.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
        state[name] = np.ascontiguousarray(x.T if transposed else x)
    return state


def read_config(hf_dir: str) -> dict:
    """The config.json of a Hugging Face model directory as a dict."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DataError(
            f"{path}: cannot be read ({e.strerror}; not a Hugging Face model directory?)"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_bf16(path: str, names: list) -> dict:
    """BF16 tensors `names` of a safetensors file as float32 (numpy has no bfloat16 of its own)."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        out = {}
        for name in names:
            start, end = header[name]["data_offsets"]
            f.seek(8 + n + start)
            raw = np.frombuffer(f.read(end - start), dtype=ml_dtypes.bfloat16)
            out[name] = raw.reshape(header[name]["shape"]).astype(np.float32)
    return out


def _read_file(path: str) -> dict:
    from safetensors import SafetensorError, safe_open

    state, bf16 = {}, []
    try:
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() == "BF16":
                    bf16.append(name)
                else:
                    state[name] = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    state.update(_read_bf16(path, bf16) if bf16 else {})
    return state


def read_state_dict(hf_dir: str) -> dict:
    """{tensor name: numpy array} of model.safetensors, or of every shard that
    model.safetensors.index.json names, in `hf_dir`."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        raise DataError(f"{hf_dir}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read)")
    state = {}
    for name in files:
        state.update(_read_file(os.path.join(hf_dir, name)))
    return state


def load(hf_dir: str, **overrides) -> tuple[ModelConfig, dict, dict]:
    """A Hugging Face model directory as (ModelConfig with `overrides`, our params, its config.json)."""
    hf = read_config(hf_dir)
    cfg = ModelConfig(**{**model_fields(hf), **overrides})
    params = params_from_state_dict(read_state_dict(hf_dir), cfg, hf["model_type"], source=hf_dir)
    return cfg, params, hf


def save(out_dir: str, params: dict, cfg: ModelConfig, ids: dict | None = None) -> str:
    """Writes config.json and model.safetensors (float32) of our params to `out_dir` as the
    Hugging Face family of `cfg`; returns the family."""
    from safetensors.numpy import save_file

    family = family_of(cfg)
    config = hf_config(cfg, ids)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        state_dict_from_params(params, cfg, family), os.path.join(out_dir, WEIGHTS_FILE), {"format": "pt"}
    )
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return family


# Our Linear names -> the Hugging Face module each adapts, inside a block (GPT-2's q/k/v share c_attn).
LORA_MODULES = {
    "gpt2": {
        "query": "attn.c_attn",
        "key": "attn.c_attn",
        "value": "attn.c_attn",
        "out": "attn.c_proj",
        "wi": "mlp.c_fc",
        "wo": "mlp.c_proj",
    },
    "llama": {
        "query": "self_attn.q_proj",
        "key": "self_attn.k_proj",
        "value": "self_attn.v_proj",
        "out": "self_attn.o_proj",
        "wi_gate": "mlp.gate_proj",
        "wi_up": "mlp.up_proj",
        "wo": "mlp.down_proj",
    },
}
_FUSED_ORDER = ("query", "key", "value")  # c_attn's output columns: q, then k, then v


def lora_state_dict(adapters: dict, cfg: ModelConfig, family: str) -> tuple[dict, dict]:
    """PEFT's LoRA tensors of our adapters, and each adapted module's rank.

    Args:
      adapters: {'layers_i': {'attn'|'mlp': {name: {'a': [*in, r], 'b': [r, *out]}}}} (numpy-able),
        as `lm.lora.init_adapters` nests them, without saved modules.
    Returns:
      ({'base_model.model.<module>.lora_A.weight': [R, in], '...lora_B.weight': [out, R]} float32,
      {module suffix, e.g. 'self_attn.q_proj': R}). R is the adapter's rank r, except on GPT-2's
      fused c_attn, where the k adapted of q/k/v stack into rank k*r: A's rows concatenated and B
      block-diagonal over its q/k/v columns, so that B A is exactly our deltas side by side.
    """
    modules = LORA_MODULES["gpt2" if family == "gpt2" else "llama"]
    block = "transformer.h.{}." if family == "gpt2" else "model.layers.{}."
    state, ranks = {}, {}
    for i in range(cfg.num_layers):
        layer = {
            name: pieces
            for group in adapters.get(f"layers_{i}", {}).values()
            for name, pieces in group.items()
        }
        for module in dict.fromkeys(modules[name] for name in layer):
            names = [n for n in modules if n in layer and modules[n] == module]  # q, k, v in order
            r = np.asarray(layer[names[0]]["a"]).shape[-1]
            a = np.concatenate([np.asarray(layer[n]["a"], np.float32).reshape(-1, r).T for n in names])
            bs = {n: np.asarray(layer[n]["b"], np.float32).reshape(r, -1).T for n in names}
            if module == "attn.c_attn":
                b = np.zeros((3 * cfg.d_model, len(names) * r), np.float32)
                for j, n in enumerate(names):
                    k = _FUSED_ORDER.index(n)
                    b[k * cfg.d_model : (k + 1) * cfg.d_model, j * r : (j + 1) * r] = bs[n]
            else:
                b = bs[names[0]]
            prefix = f"base_model.model.{block.format(i)}{module}"
            state[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
            state[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
            ranks[module] = len(names) * r
    return state, ranks
