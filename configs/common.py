"""The config sections, and which task reads which.

A config file starts from its task's `*_config()` (`pretrain_config()`, `sft_config()`, ...) and sets
what differs. Each holds the sections every task reads (model, precision, data, optimizer, schedule,
train, mesh, axis_rules, logging) and its own task's keys, nothing else: the runner loads configs with
`lock_config=True`, so a key the task does not read is an unknown key, and a mistyped override fails
instead of adding one.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """The sections every task reads: task, seed, model, precision, data, optimizer, schedule, train,
    mesh, axis_rules and logging."""
    c = ml_collections.ConfigDict()
    c.task = "pretrain"  # pretrain | mlm | finetune | sft | reward | ppo | grpo | dpo | recipe
    c.seed = 0

    # Model: keys are the fields of lm.model.ModelConfig. Defaults are GPT-2 style.
    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
    c.model.num_layers = 6
    c.model.num_heads = 6
    c.model.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query
    c.model.head_dim = 0  # 0: d_model // num_heads
    c.model.d_model = 384
    c.model.d_ff = 1536
    c.model.max_seq_len = 256
    c.model.positions = "learned"  # learned | rotary
    c.model.norm = "layernorm"  # layernorm | rmsnorm
    c.model.mlp = "gelu"  # gelu | swiglu
    c.model.tie_embeddings = True
    c.model.use_bias = True
    c.model.dropout = 0.0
    c.model.rope_theta = 10000.0
    c.model.rope_scaling = "none"  # none | llama3 (Llama 3's long-context rotary scaling)
    c.model.rope_factor = 8.0  # llama3 only: the rope_* keys below as in Hugging Face's rope_scaling
    c.model.rope_low_freq_factor = 1.0
    c.model.rope_high_freq_factor = 4.0
    c.model.rope_original_max_len = 8192
    c.model.qkv_bias = False  # biases on the query/key/value projections only (Qwen2)
    c.model.norm_eps = 1e-5
    c.model.remat = "none"  # none | full | dots: activation recomputation per block
    c.model.attention = "xla"  # xla (any backend) | cudnn (fused flash attention, NVIDIA GPUs)
    # transformer | nnlm: Bengio et al. 2003's neural probabilistic LM, pretraining only (lm.model.NNLM).
    # An NNLM reads d_model (its embedding size), vocab_size and the nnlm_* keys; the rest are unused.
    c.model.kind = "transformer"
    c.model.nnlm_context = 5  # n - 1: the tokens it conditions on (the input token and those before it)
    c.model.nnlm_hidden = 256  # tanh hidden units
    c.model.nnlm_direct = False  # direct connections from the concatenated embeddings to the logits
    c.model.bidirectional = False  # True: every token attends to its whole segment (an encoder: mlm)
    c.model.type_vocab_size = 0  # > 0: token-type embeddings, 1 after a row's first [SEP] (mlm: 2)

    c.precision = ml_collections.ConfigDict()
    c.precision.param_dtype = "float32"
    c.precision.compute_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # stdlib | text_files | tfds:<name> | graded_tasks | alpaca | hh | trl
    c.data.files = ""  # text_files, alpaca, hh, trl: a glob or a comma-separated list of .txt/.jsonl
    c.data.text_field = "text"  # the text field of .jsonl records and TFDS datasets
    c.data.data_dir = ""  # '': $LM_DATA_DIR or ~/.cache/lm/data
    c.data.eval_fraction = 0.05
    c.data.skip_bad_records = False  # instruction data: skip (and count) bad records instead of stopping
    c.data.tasks = "sort,add,reverse,constrained_line"  # graded_tasks: which tasks
    c.data.num_train = 20000  # graded_tasks: examples generated per split
    c.data.num_eval = 500
    c.data.task_seed = 0  # graded_tasks: the generator's seed (config.seed orders batches)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.decay_embeddings = False  # norms and biases are never decayed
    c.optimizer.clip_norm = 1.0  # global gradient norm; 0 disables

    c.schedule = ml_collections.ConfigDict()
    c.schedule.kind = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    c.schedule.warmup_steps = 100
    c.schedule.warmup_fraction = 0.0  # > 0: warmup is this fraction of train.steps (overrides warmup_steps)
    c.schedule.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
    c.schedule.decay_fraction = 0.2  # wsd: fraction of the steps spent decaying

    # The same meaning in every task (lm/trainer.py runs them all).
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.global_batch_size = 32
    c.train.seq_len = 256
    c.train.grad_accum = 1  # microbatches per update (lax.scan inside the step)
    c.train.log_every = 10
    c.train.eval_every = 200  # 0: only at the end
    c.train.eval_batches = 20  # 0: the whole held-out split
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.on_nonfinite = "stop"  # a step with a non-finite loss or gradient norm: stop | skip (its update)
    c.train.inject_nan_at_step = -1  # fault injection for tests: this step's gradients are NaN
    c.train.peak_flops = 0.0  # FLOP/s per device for MFU; 0: measured by a matmul probe

    # Mesh axis sizes; -1 takes the devices left over. Their product must equal the device count.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # Logical axis -> mesh axes (lm/sharding.py names the logical axes).
    c.axis_rules = [
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
    ]
    c.logging = logging_config()
    return c


def logging_config() -> ml_collections.ConfigDict:
    """Where metrics go beside metrics.jsonl and TensorBoard: Weights & Biases when wandb_project is
    set (`pip install wandb`; WANDB_MODE=offline logs without an account)."""
    c = ml_collections.ConfigDict()
    c.wandb_project = ""  # '': off
    c.wandb_entity = ""  # '': your default entity
    c.wandb_run_name = ""  # '': the workdir's name
    c.wandb_group = ""  # '': none (the recipe sets its workdir's name)
    c.wandb_tags = ""  # comma-separated
    return c


def tokenizer_config() -> ml_collections.ConfigDict:
    """The tokenizer a run trains (once, cached in the data dir) or loads: pretraining's and mlm's."""
    c = ml_collections.ConfigDict()
    c.kind = "sentencepiece"  # sentencepiece | byte
    c.vocab_size = 4096
    c.model_type = "bpe"  # bpe | unigram
    c.split_digits = True
    c.path = ""  # a trained .model to use instead of training one
    return c


def _template() -> ml_collections.ConfigDict:
    """Chat template of SFT and later stages: user + prompt + assistant, then the response and EOS."""
    t = ml_collections.ConfigDict()
    t.user = "User: "
    t.assistant = "\nAssistant: "
    return t


def _finetune(task: str) -> ml_collections.ConfigDict:
    """The base sections plus what every stage after pretraining reads: init_from and the template."""
    c = get_base_config()
    c.task = task
    c.init_from = ""  # the workdir (or a checkpoint in one) this stage starts from
    c.template = _template()  # replaced by the init_from run's template where it has one
    return c


def pretrain_config() -> ml_collections.ConfigDict:
    """Pretraining: the base sections, the tokenizer, z-loss, samples and the scaling budget."""
    c = get_base_config()
    c.task = "pretrain"
    c.train.z_loss = 0.0  # PaLM's auxiliary loss on log Z, e.g. 1e-4
    c.train.num_samples = 3  # samples printed and saved at the end
    c.train.sample_tokens = 64
    c.train.sample_prompt = ""  # '': each sample starts from BOS alone

    c.tokenizer = tokenizer_config()

    # IsoFLOP members: a FLOP budget sets train.steps, so the schedule ends at the member's own budget.
    c.scaling = ml_collections.ConfigDict()
    c.scaling.budget = 0.0  # training FLOPs; 0: train.steps as set
    c.scaling.flops = "chinchilla"  # how C is counted: chinchilla (with attention) | 6nd | 6n | palm
    return c


def mlm_config() -> ml_collections.ConfigDict:
    """Masked-LM pretraining (BERT): the base sections with bidirectional attention, the tokenizer,
    and next-sentence prediction."""
    c = get_base_config()
    c.task = "mlm"
    c.model.bidirectional = True
    c.model.type_vocab_size = 2  # BERT's segment embeddings: A (through the first [SEP]) and B
    c.tokenizer = tokenizer_config()
    c.mlm = ml_collections.ConfigDict()
    c.mlm.nsp = "binary"  # none | binary (next or another document) | three_way (+ same document)
    return c


def finetune_config() -> ml_collections.ConfigDict:
    """Downstream fine-tuning (lm.tasks.finetune): init_from, the downstream task, and the suite's
    size (data.num_train, data.num_eval: examples at most, 0 all)."""
    c = get_base_config()
    c.task = "finetune"
    c.init_from = ""  # an mlm, pretrain or later workdir (its architecture and tokenizer)
    c.data.num_train = 0
    c.data.num_eval = 0
    c.finetune = ml_collections.ConfigDict()
    c.finetune.task = "tagging"  # tagging | package | pair | span (lm.data.downstream)
    c.finetune.reinit = False  # True: the architecture and tokenizer of init_from, parameters random
    return c


def add_peft_sections(c: ml_collections.ConfigDict) -> None:
    """Prefix tuning (Li and Liang 2021; per-layer key/value prefixes, P-tuning v2) and prompt
    tuning (Lester et al. 2021) beside LoRA: length 0 = off; either freezes the base."""
    c.prefix = ml_collections.ConfigDict()
    c.prefix.length = 0  # key/value prefix positions at every layer
    c.prefix.reparam_hidden = 0  # > 0: the prefixes come from an MLP of this width (Li and Liang)
    c.prefix.lr = 0.0  # > 0: the peak learning rate when length > 0
    c.prompt_tuning = ml_collections.ConfigDict()
    c.prompt_tuning.length = 0  # soft prompt embeddings before every sequence
    c.prompt_tuning.lr = 0.0  # > 0: the peak learning rate when length > 0


def sft_config() -> ml_collections.ConfigDict:
    """SFT: init_from, the template, LoRA and the graded evaluation."""
    c = _finetune("sft")
    c.train.z_loss = 0.0

    # LoRA (Hu et al. 2021); rank 0 = full fine-tuning. quantize='nf4' stores the frozen base in
    # 4-bit NF4 (QLoRA, Dettmers et al. 2023).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = ("query", "key", "value", "out")  # also: wi, wi_gate, wi_up, wo (MLP)
    # Trained in full beside the adapters: token_embed, pos_embed, ln_final, lm_head.
    c.lora.modules_to_save = ()
    c.lora.quantize = ""  # '' | 'nf4'
    c.lora.double_quant = False  # NF4: 8-bit block scales with a float32 scale per 256 blocks
    c.lora.lr = 0.0  # > 0: the peak learning rate when rank > 0 (adapters take larger steps)

    add_peft_sections(c)

    c.sft = ml_collections.ConfigDict()
    c.sft.reinit = False  # architecture and tokenizer from init_from, parameters random
    c.sft.eval_prompts = 200  # held-out prompts answered greedily and graded at each eval
    c.sft.max_new_tokens = 32
    return c


def reward_config() -> ml_collections.ConfigDict:
    """Reward model: comparisons, and the pairwise loss."""
    c = _finetune("reward")
    c.train.length_group = 8  # this many batches drawn together and cut by length (1: plain shuffle)
    c.reward = ml_collections.ConfigDict()
    c.reward.samples_per_prompt = 4  # graded_tasks: K responses sampled from the SFT policy per prompt
    c.reward.temperature = 1.0  # graded_tasks: sampling temperature of those responses
    c.reward.max_new_tokens = 32  # graded_tasks: the longest sampled response
    c.reward.sample_batch = 256  # graded_tasks: rows per generate call (one compile per prompt bucket)
    c.reward.num_prompts = 2000  # train prompts (graded_tasks); hh: at most this many train triples, 0 all
    c.reward.num_eval_prompts = 200  # held-out prompts (graded_tasks); hh: at most this many, 0 all
    c.reward.label_noise = 0.0  # probability that a train prompt's ranking is reversed
    c.reward.margin = 0.0  # subtracted from every score difference in the loss (Llama 2)
    c.reward.likelihood_term = (
        False  # add a learned multiple of the response's mean log-prob (heads.RewardModel)
    )
    return c


def ppo_config() -> ml_collections.ConfigDict:
    """PPO: policy and reference from init_from (SFT), reward and value from ppo.reward_from.
    Defaults follow lm-human-preferences and Huang et al. 2024 where a tiny model allows."""
    c = _finetune("ppo")
    c.ppo = ml_collections.ConfigDict()
    c.ppo.reward_from = ""  # the reward-model workdir
    c.ppo.reward = "rm"  # rm | oracle (train on the grader itself: an upper reference)
    c.ppo.temperature = 1.0  # sampling temperature, also applied to the trained log-probs
    c.ppo.max_new_tokens = 32  # rollouts and evaluation answers
    c.ppo.eval_prompts = 200  # held-out prompts answered greedily at each eval
    c.ppo.epochs = 4  # passes over each rollout batch
    c.ppo.minibatches = 4  # per pass; must divide train.global_batch_size (prompts per rollout)
    c.ppo.clip = 0.2  # policy ratio clip
    c.ppo.value_clip = 0.2
    c.ppo.vf_coef = 0.1
    c.ppo.value_lr = 0.0  # the value model's peak learning rate (same schedule); 0: optimizer.lr
    c.ppo.entropy_coef = 0.0
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.kl_coef = 0.05  # β of the per-token KL penalty (the start value when adaptive)
    c.ppo.kl_target = 0.0  # > 0: adaptive β (Ziegler et al.) aiming at this KL in nats
    c.ppo.kl_horizon = 10000
    c.ppo.whiten_rewards = False
    c.ppo.missing_eos_penalty = 1.0  # subtracted from the score of a response that never ends
    c.ppo.ptx_coef = 0.0  # PPO-ptx: weight of the LM loss on SFT rows (InstructGPT: pretraining rows)
    return c


def grpo_config() -> ml_collections.ConfigDict:
    """GRPO (Shao et al. 2024; Dr. GRPO's corrections as options): policy and reference from
    init_from (SFT), no value model; the reward model from grpo.reward_from (its score, or the
    grader's with reward='oracle'). train.global_batch_size counts prompts, each sampled group_size
    times."""
    c = _finetune("grpo")
    c.grpo = ml_collections.ConfigDict()
    c.grpo.reward_from = ""  # the reward-model workdir (also the rm_score logged beside the oracle's)
    c.grpo.reward = "rm"  # rm | oracle (the grader itself: verifiable rewards)
    c.grpo.group_size = 8  # responses sampled per prompt
    c.grpo.std_normalise = True  # divide by the group's std (GRPO); False: Dr. GRPO
    c.grpo.kl_coef = 0.04  # weight of the KL to the reference
    c.grpo.kl_estimator = "k3"  # k3: per-token k3 in the loss | k1: sequence log-ratio in the reward
    c.grpo.loss_norm = "token"  # token: mean over all tokens | sequence: per-response mean, then mean
    c.grpo.epochs = 1  # passes over each rollout batch
    c.grpo.minibatches = 1  # per pass; must divide global_batch_size * group_size
    c.grpo.clip = 0.2
    c.grpo.temperature = 1.0
    c.grpo.max_new_tokens = 32  # rollouts and evaluation answers
    c.grpo.eval_prompts = 200
    c.grpo.missing_eos_penalty = 1.0
    return c


def dpo_config() -> ml_collections.ConfigDict:
    """DPO: policy and reference from init_from (SFT), comparisons from a reward-model workdir."""
    c = _finetune("dpo")
    c.train.length_group = 8
    c.dpo = ml_collections.ConfigDict()
    c.dpo.comparisons_from = ""  # a reward-model workdir whose comparisons.npz DPO trains on ('' with trl)
    c.dpo.beta = 0.1  # the implicit reward's scale (the strength of the KL constraint)
    c.dpo.eval_prompts = 200  # held-out prompts answered greedily and graded at each eval
    c.dpo.max_new_tokens = 32
    return c


def recipe_config() -> ml_collections.ConfigDict:
    """The recipe: a seed, logging (passed to every stage) and the recipe section (its stages have
    their own config files)."""
    c = ml_collections.ConfigDict()
    c.task = "recipe"
    c.seed = 0
    c.logging = logging_config()
    c.recipe = ml_collections.ConfigDict()
    return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config-file argument 'size=small,smoke' into {'size': 'small', 'smoke': True}.

    Only the names given in `defaults` are allowed; values take the type of their default.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
        default = defaults[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out


def sweep(key: str, values) -> list[dict]:
    """One sweep axis: `sweep('optimizer.lr', [1e-3, 3e-3])` -> [{'optimizer.lr': 1e-3}, ...]."""
    return [{key: v} for v in values]


def product(*axes: list[dict]) -> list[dict]:
    """Every combination of the axes (the first varies slowest), each member's overrides merged."""
    members = [{}]
    for axis in axes:
        members = [{**m, **a} for m in members for a in axis]
    return members


def zipped(*axes: list[dict]) -> list[dict]:
    """Axes of equal length taken in step: member i merges the i-th entry of each."""
    if len({len(a) for a in axes}) > 1:
        raise ValueError(f"zipped axes differ in length: {[len(a) for a in axes]}")
    return [dict(kv for part in parts for kv in part.items()) for parts in zip(*axes)]


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a pretraining config to a seconds-long CPU run of the same code paths (the `smoke` variant)."""
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.num_kv_heads = min(c.model.num_kv_heads, 2)
    c.model.head_dim = 0
    c.model.d_ff = 128 if c.model.mlp == "swiglu" else 256
    c.model.max_seq_len = 64
    c.model.vocab_size = 0
    c.tokenizer.kind = "byte"
    c.precision.compute_dtype = "float32"
    c.train.steps = 6
    c.train.global_batch_size = 8
    c.train.seq_len = 64
    c.train.grad_accum = 1
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.eval_batches = 2
    c.train.checkpoint_every = 3
    c.train.num_samples = 1
    c.train.sample_tokens = 8
    c.schedule.warmup_steps = 2
    return c
