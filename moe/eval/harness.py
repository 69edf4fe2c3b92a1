"""lm-evaluation-harness tasks on moekit's own model (the `eval` extra: `pip install 'moekit[eval]'`).

`MoekitLM` is lm-eval's model "moekit": a moekit checkpoint directory (dense Llama or MoE, as `moekit train`
loads it) with the checkpoint's own tokenizer.json, read with the `tokenizers` library (no transformers needed).

lm-eval 0.4 finds a model by name only in its own table or when the model's module has been imported (it reads
no entry points), so there are two ways in:

    python -m moekit.moe.eval.harness --model moekit --model_args pretrained=DIR --tasks T [lm-eval's options]
        (imports this module, then runs lm-eval's own command line with the same arguments)
    run_tasks(DIR, [T], ...)  (`moekit eval --tasks`: lm_eval.simple_evaluate with a MoekitLM)

What matches lm-eval's `--model hf` on the same directory (float32; HFLM's defaults), token for token:
- tokens: the tokenizer.json's own encode with its special tokens (BOS where its post-processor adds one),
  none added to a string that already starts with the BOS text; a (context, continuation) pair is encoded whole
  and split after the context's tokens (lm-eval's `TemplateLM._encode_pair`); an empty context is the BOS id
  (else EOS); BOS / EOS are tokenizer_config.json's bos_token / eos_token, as transformers reads them;
- loglikelihood: context + continuation left-truncated to max_length + 1 tokens, the last one only predicted;
  requests sorted longest first and one-token continuations sharing a context scored from one forward pass
  (lm-eval's Collator); right padding, which causal attention never sees; the LM head and a float32
  log-softmax at the scored positions only;
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` / `make_disjoint_window` with max_length and the
  BOS (else EOS) prefix, summed per document;
- generate_until: the context left-truncated to max_length - max_gen_toks tokens, greedy decoding (or sampling with
  temperature / top_k / top_p) until an EOS id (tokenizer's, config.json's, generation_config.json's), a stop
  string in the text, or max_gen_toks tokens; decoded without special tokens and cut at the first stop string.
  Prompts of one length are batched together (no padding: each row keeps the positions it has alone).
- max_length: `max_length=` else config.json's max_position_embeddings; max_gen_toks 256 by default.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys

import torch
from tqdm.auto import tqdm

from moekit.llama.errors import ConfigError, MoekitError, one_line, shown
from moekit.llama.generate import sample
from moekit.llama.io import read_side_json
from moekit.moe.train.source import load_model
from moekit.moe.train.tokenizer import HFTokenizer, check_fits

try:  # the `eval` extra; without it this module still imports, and every entry says how to install it
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    TemplateLM, register_model = object, None

log = logging.getLogger(__name__)
INSTALL = "lm-eval is not installed: pip install 'moekit[eval]'"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLING = ("do_sample", "temperature", "top_k", "top_p")  # generation kwargs moekit's sampler takes
PROGRESS_MIN = 32  # requests from which a progress bar is shown
CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
           (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # transformers' clean_up_tokenization


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None


def checked_dir(model_dir) -> str:
    """A checkpoint directory holding a tokenizer.json (lm-eval's tasks are text)."""
    directory = os.path.abspath(str(model_dir))
    if not os.path.isdir(directory):
        raise ConfigError(f"{shown(str(model_dir))}: not a checkpoint directory")
    if not os.path.lexists(os.path.join(directory, "tokenizer.json")):
        raise ConfigError(f"{directory}: no tokenizer.json; lm-eval's tasks need the checkpoint's own tokenizer "
                          "(moekit train and moekit upcycle write it beside the weights)")
    return directory


def positive_int(value, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{name} {shown(value)}: expected a positive whole number (--model moekit has no 'auto')")
    return n


class MoekitLM(TemplateLM):
    """lm-eval's model "moekit": `pretrained` a moekit checkpoint directory; `batch_size` requests per forward
    pass; `dtype` float32 | bfloat16; `max_length` the context window (default: max_position_embeddings);
    `device` (default: cuda when available; the CPU when cuda is asked for but absent). lm-eval passes
    max_batch_size too (for its 'auto' batch size: ignored)."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, dtype: str = "float32",
                 max_length: int | str | None = None, device: str | None = None, max_batch_size=None, **other):
        require_lm_eval()
        super().__init__()
        if other:
            raise ConfigError(f"model_args {shown(sorted(other))}: --model moekit takes pretrained, batch_size, "
                              "dtype, max_length, device")
        directory = checked_dir(pretrained)
        self.batch_size = positive_int(batch_size, "batch_size")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {shown(dtype)}: expected one of {', '.join(DTYPES)}")
        source = load_model(directory)
        self.hf = HFTokenizer(os.path.join(directory, "tokenizer.json"), source.config)
        self.tok = self.hf.tok  # the `tokenizers` Tokenizer: its encode with special tokens is transformers'
        check_fits(self.hf, source.model.config.vocab_size)
        cuda = torch.cuda.is_available()
        if device and device.startswith("cuda") and not cuda:  # lm-eval's CLI asks for cuda:0 by default
            log.warning("moekit: no CUDA device here; evaluating on the CPU")
            device = "cpu"
        self._device = torch.device(device or ("cuda" if cuda else "cpu"))
        self.model = source.model.to(device=self._device, dtype=DTYPES[dtype]).eval()
        self.model.model.rotary_emb.reset(self._device)  # RoPE frequencies stay float32 in a bfloat16 model
        self.directory, self.dtype = directory, dtype
        self.max_length = positive_int(max_length, "max_length") if max_length else \
            self.model.config.max_position_embeddings
        self.bos_id, self.eos_id = self._special("bos"), self._special("eos")
        self.stop_ids = {i for i in (self.eos_id, *self._config_eos(source.config)) if i is not None}
        self.cleanup = bool((read_side_json(directory, "tokenizer_config.json") or {})
                            .get("clean_up_tokenization_spaces", False))
        self.requested = False  # set by the first request: a failure before it is the tasks' (see run_tasks)

    # ---- tokens, as lm-eval's hf model makes them ----------------------------------------------------------
    def _special(self, kind: str) -> int | None:
        """transformers' bos_token_id / eos_token_id: tokenizer_config.json's (else special_tokens_map.json's)
        token, else what moekit's tokenizer finds (config.json's id, the usual names)."""
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            token = (read_side_json(self.directory, name) or {}).get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tok.token_to_id(token) is not None:
                return self.tok.token_to_id(token)
        return getattr(self.hf, f"{kind}_id")

    def _config_eos(self, config: dict) -> list:
        """The EOS ids generation stops at: config.json's and generation_config.json's eos_token_id."""
        ids = []
        for d in (config, read_side_json(self.directory, "generation_config.json") or {}):
            value = d.get("eos_token_id")
            ids += [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]
        return ids

    @property
    def eot_token_id(self) -> int | None:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS, else EOS (lm-eval's hf model)."""
        prefix = self.bos_id if self.bos_id is not None else self.eos_id
        if prefix is None:
            raise ConfigError(f"{self.directory}/tokenizer.json: no BOS or EOS token to condition an empty context "
                              "or a rolling window on")
        return prefix

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.directory.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """The tokenizer's ids with its special tokens (BOS), unless the string starts with the BOS text."""
        if add_special_tokens is None:
            prefix = self.bos_id if self.bos_id is not None else self.eos_id
            add_special_tokens = prefix is None or not string.startswith(self.tok.decode([prefix],
                                                                                         skip_special_tokens=False))
        ids = self.tok.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        for before, after in CLEANUP if self.cleanup else ():
            text = text.replace(before, after)
        return text

    def _progress(self, n: int, what: str, disable: bool):
        return tqdm(total=n, desc=f"moekit {what}", disable=disable or n < PROGRESS_MIN)

    def _hidden(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """ids [B, S] -> the decoder's output [B, S, H]; the LM head runs only where a score is needed."""
        return self.model.model(ids, cache=cache)[0]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, n, H] -> logits [B, n, V] (float32)."""
        return self.model.head(h)[0].float()

    # ---- the three requests -------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.requested = True
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)  # tokens: TemplateLM._encode_pair

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (log P(continuation | context), greedy?)."""
        from lm_eval.models.utils import Collator

        self.requested = True
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])), group_by="contexts",
                         group_fn=lambda r: r[1] + r[2][:-1])  # longest first; one pass per shared context
        out, bar = [], self._progress(len(requests), "loglikelihood", disable_tqdm)
        for chunk in order.get_batched(n=self.batch_size):
            for _, _, cont in chunk:
                if not 0 < len(cont) <= self.max_length:
                    raise ConfigError(f"a continuation of {len(cont)} tokens; max_length {self.max_length} "
                                      "holds 1 to max_length")
            # the window: the last max_length + 1 tokens, the last of them only predicted
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(map(len, inputs))
            ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=self.device)  # [B, S]
            hidden = self._hidden(ids)  # [B, S, H]; right padding: no real position sees it
            for (req, ctx, cont), x, h in zip(chunk, inputs, hidden):
                row = self._logits(h[None, len(x) - len(cont):len(x)]).log_softmax(-1)  # [1, n, V]: predicting cont
                for key, toks, scores in order.get_cache(req_str=req, cxt_toks=ctx, cont_toks=cont, logits=row):
                    target = torch.tensor(toks, device=self.device)[None]  # [1, n']
                    scores = scores[:, -target.shape[1]:]  # [1, n', V] (a shorter one-token continuation)
                    answer = (float(scores.gather(2, target[..., None]).sum()),
                              bool((scores.argmax(-1) == target).all()))
                    out.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    bar.update(1)
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over max_length windows, every token predicted once."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        self.requested = True
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in pairs]
            counts.append(len(pairs))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm))
        out = []
        for request, n in zip(requests, counts):
            out.append(sum(next(scores)[0] for _ in range(n)))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
        from lm_eval.models.utils import postprocess_generated_text as cut_at_stop

        self.requested = True
        eos = self.tok.decode([self.eos_id], skip_special_tokens=False) if self.eos_id is not None else None
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        out, bar = [], self._progress(len(requests), "generate_until", disable_tqdm)
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)  # one kind of kwargs per chunk
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                  f"{self.max_length}")
            sampling = self._sampling(kwargs)
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            for _, rows in itertools.groupby(prompts, key=len):  # sorted longest first: runs of one length
                for ids in self._generate(list(rows), max_new, until, sampling):
                    out.append(cut_at_stop(self.tok_decode(ids), until, None))
                    bar.update(1)
        bar.close()
        results = order.get_original(out)
        for request, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    @staticmethod
    def _sampling(kwargs: dict) -> dict:
        """moekit's sampler arguments from normalised generation kwargs (greedy unless do_sample)."""
        other = sorted(set(kwargs) - set(SAMPLING))
        if other:
            raise ConfigError(f"generation kwargs {shown(other)}: --model moekit takes only "
                              f"{', '.join(SAMPLING)} (with until and max_gen_toks)")
        if not kwargs.get("do_sample"):
            return {}
        return {k: kwargs[k] for k in ("temperature", "top_k", "top_p") if kwargs.get(k) is not None}

    @torch.inference_mode()
    def _generate(self, rows: list[list[int]], max_new: int, until: list[str], sampling: dict) -> list[list[int]]:
        """Continue prompts of one length (a batch without padding) with the KV cache; a row stops at an EOS
        id or once its text holds a stop string."""
        cache = self.model.new_cache(len(rows), len(rows[0]) + max_new)
        logits = self._logits(self._hidden(torch.tensor(rows, device=self.device), cache)[:, -1:])[:, -1]  # [B, V]
        new, live = [[] for _ in rows], set(range(len(rows)))
        for step in range(max_new):
            nxt = sample(logits, **sampling)  # [B]
            for i, t in enumerate(nxt.tolist()):
                if i not in live:
                    continue
                new[i].append(t)
                text = self.tok.decode(new[i], skip_special_tokens=False)
                if t in self.stop_ids or any(s and s in text for s in until):
                    live.discard(i)
            if not live or step == max_new - 1:
                break
            logits = self._logits(self._hidden(nxt[:, None], cache))[:, -1]
        return new

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": self.dtype, "model_path": self.directory}


if register_model is not None and __name__ != "__main__":  # `python -m` runs this file as __main__ too: the
    register_model("moekit")(MoekitLM)  # module proper registers the one class (see the end of the file)


# ---- entry points ---------------------------------------------------------------------------------------------

def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager for `tasks`, each checked: a task name (lm-eval's or the include path's) or a task
    YAML file. When every task is a task of the include path or a task file, without lm-eval's own tasks (it
    indexes its ~15,000 built-in tasks in about 9 s)."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("--tasks: no task named")
    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {shown(include_path)}: not a directory of lm-eval task YAML files")
    files = {t: task_file(t) for t in tasks if t.endswith((".yaml", ".yml")) or os.path.isfile(t)}
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(files.get(t) == "task" or t in local.all_subtasks for t in tasks):
        return local
    manager = TaskManager(include_path=include_path)
    for t in tasks:
        if t not in manager.all_tasks and t not in files:
            where = f" nor in --include-path {include_path}{broken_yaml(include_path)}" if include_path else ""
            raise ConfigError(f"unknown task {shown(t)}: not one of lm-eval's tasks (lm-eval ls tasks){where}")
    return manager


def task_file(path: str) -> str:
    """What the task YAML file `path` holds: 'task' or 'group'; a one-line error when lm-eval cannot read it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not os.path.isfile(path):
        raise ConfigError(f"task file {shown(path)} does not exist")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # YAML syntax, a missing include
        raise ConfigError(f"task file {path} failed to load ({first_line(e)})") from None
    if "group" in cfg or "task" not in cfg:
        return "group"
    return "task"


def broken_yaml(include_path: str) -> str:
    """'; FILE failed to load (REASON)' for the first task YAML under `include_path` lm-eval cannot read."""
    from pathlib import Path

    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(Path(include_path).glob("**/*.yaml")):
        try:
            cfg = load_yaml(path, resolve_func=False)
            if "task" not in cfg and "group" not in cfg:
                raise ValueError("neither a 'task' nor a 'group' key")
        except Exception as e:  # YAML syntax, a missing include, a wrong shape
            return f"; {path} failed to load ({first_line(e)})"
    return ""


def first_line(e: BaseException) -> str:
    return one_line((str(e).strip().splitlines() or [type(e).__name__])[0], 200)


def run_tasks(model_dir: str, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
              include_path: str | None = None, batch_size: int = 8, dtype: str = "float32",
              log_samples: bool = False) -> dict:
    """lm-eval's results (lm_eval.simple_evaluate) of the checkpoint `model_dir` on `tasks` (lm-eval's task names,
    the include path's, or task YAML files); `limit` documents per task, `num_fewshot` examples in each prompt."""
    require_lm_eval()
    import lm_eval

    checked_dir(model_dir)
    tasks = [str(t) for t in tasks]
    manager = task_manager(tasks, None if include_path is None else str(include_path))
    lm = MoekitLM(pretrained=model_dir, batch_size=batch_size, dtype=dtype)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       log_samples=log_samples, task_manager=manager)
    except MoekitError:
        raise
    except Exception as e:
        if lm.requested:  # the model's work: not a task's fault
            raise
        raise ConfigError(f"task {', '.join(shown(t) for t in tasks)} failed to load: {first_line(e)}") from e


def main(argv: list[str] | None = None) -> int:
    """`python -m moekit.moe.eval.harness ARGS`: lm-eval's own command line on ARGS, with --model moekit known.
    moekit's errors are one line (exit 2); lm-eval's are its own."""
    try:
        require_lm_eval()
        from lm_eval.__main__ import cli_evaluate

        sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]  # lm-eval's parser reads sys.argv
        cli_evaluate()
    except MoekitError as e:
        print(one_line(f"moekit eval: {e}"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from moekit.moe.eval import harness  # the module proper (registered), not this __main__ copy

    sys.exit(harness.main())
