"""`LoopnnEvalLM`: an lm-evaluation-harness model for loopnn models, with a loop-count argument.

    import lm_eval, loopnn.hf
    lm = loopnn.hf.LoopnnEvalLM("hf/x", n_loops=8, batch_size=8)   # HF dir, loopnn run/checkpoint, or a model
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
Works without lm-eval installed (then it is a plain class with the same three methods). Scoring follows the
harness's HF model: context/continuation split on the encoded concatenation, left truncation to max_length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loopnn.errors import LoopnnError
from loopnn.model import KVCache, LoopGPT

try:
    from lm_eval.api.model import LM as _Base
except ImportError:  # lm-eval is optional; the adapter still works as a plain object
    _Base = object


def _args(request: Any) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _as_loopgpt(pretrained: Any) -> tuple[LoopGPT, int | None]:
    """(LoopGPT, default n_loops) from a model object or a path."""
    from loopnn.hf.modeling import LoopnnForCausalLM

    if isinstance(pretrained, LoopGPT):
        return pretrained, None
    if isinstance(pretrained, LoopnnForCausalLM):
        return pretrained.model, pretrained.config.inference_n_loops
    path = Path(pretrained)
    if (path / "config.json").is_file():
        from loopnn.jsonio import read_json

        if read_json(path / "config.json", "HF config.json").get("model_type") == "loopnn":
            hf = LoopnnForCausalLM.from_pretrained(path)
            return hf.model, hf.config.inference_n_loops
        from loopnn.hf.convert import load_gpt2

        return load_gpt2(path), None
    from loopnn.checkpoint import load_model

    return load_model(path)[0], None


class LoopnnEvalLM(_Base):
    """lm-eval `LM` over a LoopGPT. String arguments (from `model_args`) are converted."""

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        n_loops: int | str | None = None,
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        device: str | None = None,
        **_: Any,  # max_batch_size etc. from the harness
    ):
        if _Base is not object:
            super().__init__()
        model, default_loops = _as_loopgpt(pretrained)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise LoopnnError(f"device {device!r} asked for, but CUDA is not available; pass device=cpu")
        self._device = torch.device(device)  # lm-eval's evaluator reads self.device
        self.model = model.to(self._device).eval()
        if tokenizer is None or isinstance(tokenizer, str):
            from loopnn.hf.modeling import gpt2_tokenizer

            tokenizer = gpt2_tokenizer() if tokenizer is None else _auto_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.n_loops = int(n_loops) if n_loops not in (None, "") else default_loops
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_length = int(max_length) if max_length else self.model.config.block_size
        self.eot = tokenizer.eos_token_id

    # -- tokenization -------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.eot], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())  # trailing context spaces belong to the continuation
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx) :]

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax (T_i, vocab) for each token row; rows are right-padded together (causal: padding is unseen)."""
        device = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(r) for r in chunk)
            idx = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
            logits, _ = self.model(idx, n_loops=self.n_loops)
            logp = F.log_softmax(logits.float(), dim=-1)
            out += [logp[i, : len(r)] for i, r in enumerate(chunk)]
        return out

    def _score(self, tokens: list[list[int]], n_targets: list[int]) -> list[tuple[float, bool]]:
        """For each token list, the summed log-prob of its last n targets and whether greedy decoding gives them."""
        rows = [t[-(self.max_length + 1) :][:-1] for t in tokens]
        results = []
        for t, n, logp in zip(tokens, n_targets, self._logprobs(rows)):
            n = min(n, len(logp))  # a continuation longer than max_length is scored on its last tokens only
            target = torch.tensor(t[-n:], device=logp.device) if n else torch.empty(0, dtype=torch.long)
            picked = logp[-n:] if n else logp[:0]
            score = picked.gather(-1, target[:, None]).sum().item()
            results.append((score, bool((picked.argmax(-1) == target).all())))
        return results

    # -- the harness interface ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self._split(*_args(r)[:2]) for r in requests]
        return self._score([c + t for c, t in pairs], [len(t) for _, t in pairs])

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Whole-document log-likelihood in windows of max_length, each prediction with the most context."""
        totals = []
        for request in requests:
            tokens = [self.eot] + self._encode(_args(request)[0])
            windows, n_targets = [], []
            for s in range(1, len(tokens), self.max_length):
                e = min(s + self.max_length, len(tokens))
                windows.append(tokens[max(0, e - 1 - self.max_length) : e])
                n_targets.append(e - s)
            totals.append(sum(score for score, _ in self._score(windows, n_targets)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy decoding with loopnn's KV cache until a stop string, EOT or max_gen_toks."""
        device = next(self.model.parameters()).device
        outputs = []
        for request in requests:
            context, gen_kwargs = _args(request)[:2]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            max_new = min(max_new, self.model.config.block_size - 1)
            ids = self._encode(context)[-(self.model.config.block_size - max_new) :] or [self.eot]
            cache = KVCache(len(ids) + max_new)
            logits = self.model.decode(torch.tensor([ids], device=device), cache, self.n_loops)
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                token = int(logits[0, -1].argmax())
                if token == self.eot:
                    break
                new.append(token)
                text = self.tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
                if len(new) < max_new:
                    step = torch.tensor([[token]], device=device)
                    logits = self.model.decode(step, cache, self.n_loops)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def _auto_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def main() -> None:
    """`python -m loopnn.hf.harness ARGS`: lm-eval's own CLI, with loopnn's classes registered first.

    --model hf --model_args pretrained=DIR,inference_n_loops=8   (the harness's HF model on LoopnnForCausalLM)
    --model loopnn --model_args pretrained=PATH,n_loops=8        (LoopnnEvalLM; PATH may be a loopnn run dir)
    """
    import lm_eval.models  # noqa: F401  (fills the registry first; the harness fills it lazily only when empty)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import register_model

    from loopnn.hf.modeling import register_auto_classes

    register_auto_classes()  # model_type "loopnn" for AutoConfig / AutoModelForCausalLM
    register_model("loopnn")(LoopnnEvalLM)
    cli_evaluate()


if __name__ == "__main__":
    main()
