"""config.data.source = 'trl': TRL-style JSONL for SFT ("messages"), the reward model and DPO
("prompt", "chosen", "rejected") and PPO / GRPO ("prompt"), down to token ids, plus one smoke run
of each task from these files."""

import json
import os

import ml_collections
import numpy as np
import pytest
from conftest import ONE_DEVICE, run_module

from lm import checkpoint, rollouts
from lm.data import preferences, sft
from lm.data.tokenizer import BOS_ID, EOS_ID, ByteTokenizer
from lm.errors import ConfigError, DataError

TOK = ByteTokenizer()
SEQ_LEN = 64


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _data_cfg(tmp_path, files, **extra):
    return ml_collections.ConfigDict(
        {
            "source": "trl",
            "files": files,
            "data_dir": str(tmp_path / "data"),
            "eval_fraction": 0.25,
            "skip_bad_records": False,
            **extra,
        }
    )


def _conversations(n=24):
    """Single-turn conversations, every third with a system turn and a second exchange."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        if i % 3 == 0:
            messages = [
                {"role": "system", "content": "sys"},
                *messages,
                {"role": "user", "content": f"{i}?"},
                {"role": "assistant", "content": f"b{i}"},
            ]
        out.append({"messages": messages})
    return out


def _pairs(n=24):
    """String triples, every fourth in TRL's conversational form."""
    out = []
    for i in range(n):
        if i % 4 == 0:
            out.append(
                {
                    "prompt": [{"role": "user", "content": f"c{i}"}],
                    "chosen": [{"role": "assistant", "content": f"good {i}"}],
                    "rejected": [{"role": "assistant", "content": f"bad {i}"}],
                }
            )
        else:
            out.append({"prompt": f"p{i}", "chosen": f"yes {i}", "rejected": f"no {i}", "score": i})
    return out


# --- formatting ---------------------------------------------------------------------------------


def test_message_lists_render_in_the_config_template():
    user_only = [{"role": "user", "content": "hi"}]
    assert sft.format_prompt({}, user_only) == sft.format_prompt({}, "hi") == "User: hi\nAssistant: "
    turns = _conversations(1)[0]["messages"][:-1]
    assert sft.format_prompt({}, turns) == "sys\n\nUser: q0\nAssistant: a0\nUser: 0?\nAssistant: "
    hh_style = {"user": "", "assistant": " "}
    assert sft.format_prompt(hh_style, turns) == "sys\n\nq0 a0\n0? "


def test_a_chat_template_renders_the_whole_message_list():
    class Chat:
        chat_template, bos_token, bos_id = "<template>", "<s>", 1

        def apply_chat_template(self, messages, add_generation_prompt=True):
            assert add_generation_prompt
            return "<s>" + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    turns = _conversations(1)[0]["messages"][:-1]
    text = sft.format_prompt({}, turns, Chat())
    assert text == "<system>sys<user>q0<assistant>a0<user>0?<assistant>"


# --- SFT ----------------------------------------------------------------------------------------


def test_sft_loss_is_on_exactly_the_final_assistant_turn(tmp_path):
    lines = _conversations()
    files = _write(tmp_path / "sft.jsonl", lines)
    data = sft.prepare_sft_data(_data_cfg(tmp_path, files), {}, TOK, SEQ_LEN)
    assert data.info["splits"]["train"]["num_examples"] + data.info["splits"]["eval"]["num_examples"] == 24
    builder = preferences.open_files_dataset(_data_cfg(tmp_path, files), "sft")
    for split, packed in (("train", data.train), ("validation", data.eval)):
        examples = sft.read_examples(builder, split)
        tokens, loss = [], []
        for e in examples:
            line = lines[int(e["record"].rsplit(":", 1)[1]) - 1]["messages"]
            assert e["prompt"] == line[:-1] and e["response"] == line[-1]["content"]
            prompt = [BOS_ID, *TOK.encode(sft.format_prompt({}, line[:-1]))]
            response = [*TOK.encode(line[-1]["content"]), EOS_ID]
            tokens += prompt + response
            loss += [False] * len(prompt) + [True] * len(response)
        np.testing.assert_array_equal(packed.tokens, tokens)
        np.testing.assert_array_equal(packed.loss_tokens, loss)
        rows = packed.rows(np.arange(packed.num_rows))
        trained = rows["targets"][rows["loss_mask"] > 0]
        expected = [t for e in examples for t in [*TOK.encode(e["response"]), EOS_ID]]
        np.testing.assert_array_equal(trained, expected)  # every assistant token, and nothing else


def test_prompt_completion_pairs_train_like_single_turn_conversations(tmp_path):
    pairs = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)]
    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(12)
    ]
    a = sft.prepare_sft_data(_data_cfg(tmp_path, _write(tmp_path / "a.jsonl", pairs)), {}, TOK, SEQ_LEN)
    b = sft.prepare_sft_data(_data_cfg(tmp_path, _write(tmp_path / "b.jsonl", chats)), {}, TOK, SEQ_LEN)

    def examples(data):  # every example's tokens and loss flags (the splits differ: prompts hash apart)
        out = []
        for rows in (data.train, data.eval):
            starts = np.flatnonzero(rows.tokens == BOS_ID)[1:]
            out += [
                (tuple(t), tuple(m))
                for t, m in zip(np.split(rows.tokens, starts), np.split(rows.loss_tokens, starts))
            ]
        return sorted(out)

    assert examples(a) == examples(b) and len(examples(a)) == 12


@pytest.mark.parametrize(
    "kind,line,expected",
    [
        ("sft", {"messages": "hi"}, 'expected \'messages\': a list of {"role", "content"} objects'),
        ("sft", {"messages": [{"role": "user", "content": "q"}]}, "ending in an assistant turn"),
        ("sft", {"messages": [{"role": "bot", "content": "q"}]}, "message 1 has role 'bot'"),
        ("preference", {"prompt": "p", "chosen": "c"}, 'expected "prompt", "chosen" and "rejected"'),
        (
            "preference",
            {"prompt": "p", "chosen": "c", "rejected": 3},
            "expected 'rejected': a string or a list",
        ),
        ("prompt", {"question": "p"}, 'expected "prompt"'),
    ],
)
def test_a_malformed_line_names_its_file_and_line(tmp_path, kind, line, expected):
    good = {"sft": _conversations(4), "preference": _pairs(4), "prompt": _pairs(4)}[kind]
    files = _write(tmp_path / "bad.jsonl", [*good[:2], line, *good[2:]])
    with pytest.raises(DataError) as error:
        preferences.open_files_dataset(_data_cfg(tmp_path, files), kind)
    message = str(error.value)
    assert "\n" not in message and f"{files}:3 " in message and expected in message, message


# --- reward model and DPO -------------------------------------------------------------------------


def test_preference_pairs_have_the_chosen_and_rejected_token_ids(tmp_path):
    lines = _pairs()
    cfg = _data_cfg(tmp_path, _write(tmp_path / "pairs.jsonl", lines))
    data = preferences.pair_comparisons(cfg, {}, TOK, SEQ_LEN, (0, 0))
    builder = preferences.open_files_dataset(cfg, "preference")
    seen = 0
    for split, comparisons in (("train", data.train), ("validation", data.eval)):
        examples = sft.read_examples(builder, split)
        assert comparisons.num_prompts == len(examples)
        for i, e in enumerate(examples):
            line = lines[int(e["record"].rsplit(":", 1)[1]) - 1]
            texts = [r if isinstance(r, str) else r[0]["content"] for r in (line["chosen"], line["rejected"])]
            prompt = [BOS_ID, *TOK.encode(sft.format_prompt({}, line["prompt"]))]
            for j, text in enumerate(texts):
                expected = prompt + TOK.encode(text) + [EOS_ID]
                assert comparisons.last_index[i, j] == len(expected) - 1
                assert comparisons.first_index[i, j] == len(prompt)
                np.testing.assert_array_equal(comparisons.tokens[i, j, : len(expected)], expected)
                assert (comparisons.tokens[i, j, len(expected) :] == TOK.pad_id).all()
            assert comparisons.ranks[i].tolist() == [0, 1] and comparisons.mask[i].all()
            seen += 1
    assert seen == len(lines) and data.info["source"] == "trl"
    assert data.train.num_prompts == len(data.norm_tokens) - data.eval.num_prompts  # chosen responses
    np.testing.assert_array_equal(data.norm_tokens[: data.train.num_prompts], data.train.tokens[:, 0])


def test_dpo_reads_trl_pairs_without_a_reward_workdir():
    from configs.dpo import trl as dpo_trl
    from lm.tasks import dpo

    config = dpo_trl.get_config("smoke")
    config.init_from, config.data.files = "runs/sft", "pairs.jsonl"
    dpo.validate(config)  # no comparisons_from needed
    config.dpo.comparisons_from = "runs/rm"
    with pytest.raises(ConfigError, match="both name DPO's pairs; set one"):
        dpo.validate(config)
    config.data.source = "stdlib"
    dpo.validate(config)  # the reward-workdir path as before
    config.dpo.comparisons_from = ""
    with pytest.raises(ConfigError, match="config.dpo.comparisons_from"):
        dpo.validate(config)


# --- PPO and GRPO prompts ---------------------------------------------------------------------------


def test_rl_prompts_are_the_files_prompts(tmp_path):
    from configs.ppo import trl as ppo_trl

    lines = [{"prompt": f"tell me {i % 20}", "chosen": "x", "id": i} for i in range(30)]  # 10 repeats
    lines.append({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
    config = ppo_trl.get_config("smoke")
    config.data.files = _write(tmp_path / "prompts.jsonl", lines)
    config.data.data_dir, config.data.eval_fraction = str(tmp_path / "data"), 0.25
    train, held_out, info = rollouts.prompt_examples(
        config, TOK, {}, SEQ_LEN, eval_prompts=100, max_new_tokens=config.ppo.max_new_tokens
    )
    got = [e["prompt"] for e in train + held_out]
    want = list({json.dumps(line["prompt"]): line["prompt"] for line in lines}.values())
    assert len(got) == len(want) == 21 and sorted(map(json.dumps, got)) == sorted(map(json.dumps, want))
    assert (
        train
        and held_out
        and info == {"prompt_source": "trl", "num_skipped_too_long": {"train": 0, "validation": 0}}
    )
    assert preferences.file_prompts(config.data, "train") == [e["prompt"] for e in train]


def test_trl_prompts_have_no_oracle():
    rollouts.check_source("trl", "rm", "grpo")
    with pytest.raises(ConfigError) as error:
        rollouts.check_source("trl", "oracle", "grpo")
    assert str(error.value) == (
        "config.grpo.reward='oracle' needs a grader: the 'trl' prompts (config.data.source='trl') "
        "have none; use reward='rm'"
    )


# --- end to end -----------------------------------------------------------------------------------

STEPS = ["--config.train.steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2"]


def _run(config, workdir, *args):
    result = run_module(
        "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}", *STEPS, *args, env=ONE_DEVICE
    )
    assert result.returncode == 0, (config, result.stderr[-3000:])
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def trl_chain(tmp_path_factory):
    """A 2-step smoke pretrain, then SFT and a reward model on TRL files: their workdirs and files."""
    root = tmp_path_factory.mktemp("trl")
    files = {
        "sft_file": _write(root / "sft.jsonl", _conversations()),
        "pairs_file": _write(root / "pairs.jsonl", _pairs()),
    }
    dirs = {stage: str(root / stage) for stage in ("pretrain", "sft", "reward")}
    _run("configs/pretrain/tiny.py:smoke", dirs["pretrain"])
    data = ["--config.data.eval_fraction=0.25"]
    _run("configs/sft/trl.py:smoke", dirs["sft"], f"--config.init_from={dirs['pretrain']}",
         f"--config.data.files={files['sft_file']}", *data)  # fmt: skip
    _run("configs/reward/trl.py:smoke", dirs["reward"], f"--config.init_from={dirs['sft']}",
         f"--config.data.files={files['pairs_file']}", *data)  # fmt: skip
    return {**dirs, **files, "root": root}


def test_sft_and_reward_runs_on_trl_files(trl_chain):
    sft_records = [json.loads(line) for line in open(os.path.join(trl_chain["sft"], "metrics.jsonl"))]
    assert any("eval_loss" in r for r in sft_records)
    saved = json.load(open(os.path.join(trl_chain["sft"], "config.json")))
    assert saved["run"]["data"]["source"] == "trl" and saved["run"]["data"]["build"]["kind"] == "sft"
    norm = json.load(open(os.path.join(trl_chain["reward"], "reward_norm.json")))
    assert norm["responses"] == "chosen responses" and norm["num_responses"] == 24


@pytest.mark.slow  # DPO and GRPO on these files also run from the imported model below
def test_dpo_ppo_and_grpo_run_on_trl_files(trl_chain):
    root, common = (
        trl_chain["root"],
        [f"--config.init_from={trl_chain['sft']}", "--config.data.eval_fraction=0.25"],
    )
    files = f"--config.data.files={trl_chain['pairs_file']}"
    dpo_records = _run("configs/dpo/trl.py:smoke", root / "dpo", *common, files)
    assert any("eval_accuracy" in r for r in dpo_records)
    saved = json.load(open(root / "dpo" / "config.json"))
    assert saved["run"]["comparisons_from"] == "" and saved["run"]["data"]["train"]["num_pairs"] > 0
    for task in ("ppo", "grpo"):
        records = _run(f"configs/{task}/trl.py:smoke", root / task, *common, files,
                       f"--config.{task}.reward_from={trl_chain['reward']}")  # fmt: skip
        assert any("eval_rm_score" in r for r in records), task
        assert json.load(open(root / task / "config.json"))["run"]["prompt_source"] == "trl"


def test_a_malformed_line_is_one_error_line_and_exit_2(trl_chain, tmp_path):
    lines = _conversations(6)
    lines[4] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}
    files = _write(tmp_path / "train.jsonl", lines)
    result = run_module(
        "-m", "experiments.run", "--config=configs/sft/trl.py:smoke", f"--workdir={tmp_path / 'w'}",
        f"--config.init_from={trl_chain['pretrain']}", f"--config.data.files={files}", env=ONE_DEVICE,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and f"{files}:5 expected 'messages'" in errors[0], errors


def test_sft_dpo_and_grpo_start_from_an_imported_hugging_face_model(trl_chain):
    """init_from=hf:DIR: a random Qwen2 built by transformers, with our byte tokenizer exported as
    its tokenizer.json, is SFT-ed on the TRL conversations; DPO and GRPO start from that SFT run."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lm.data import tokenizer as tokenizer_lib

    root = trl_chain["root"]
    hf_dir = str(root / "hf_qwen2")
    config = transformers.Qwen2Config(
        vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    tokenizer_lib.write_hf_tokenizer(TOK, hf_dir)
    data = ["--config.data.eval_fraction=0.25"]
    sft_records = _run("configs/sft/trl.py:smoke", root / "sft_hf", f"--config.init_from=hf:{hf_dir}",
                       f"--config.data.files={trl_chain['sft_file']}", *data)  # fmt: skip
    losses = [r["loss"] for r in sft_records if "loss" in r]
    assert losses and np.isfinite(losses).all()
    model = checkpoint.read_run_config(str(root / "sft_hf"))["model"]  # adopted from the import
    assert model["qkv_bias"] and not model["use_bias"] and model["num_kv_heads"] == 2  # Qwen2's
    common = [
        f"--config.init_from={root / 'sft_hf'}",
        f"--config.data.files={trl_chain['pairs_file']}",
        *data,
    ]
    dpo_records = _run("configs/dpo/trl.py:smoke", root / "dpo_hf", *common)
    assert any("eval_accuracy" in r for r in dpo_records)
    grpo_records = _run("configs/grpo/trl.py:smoke", root / "grpo_hf", *common,
                        f"--config.grpo.reward_from={trl_chain['reward']}")  # fmt: skip
    assert any("eval_rm_score" in r for r in grpo_records)
