"""PromptDFD's reinforced prompter (Ma et al., "Prompting to Distill", IJCAI 2022, Section 3.3).

A small causal LM (the prompter, ``--prompter``) writes a topic prompt P of ``prompt_length``
tokens after one of nine initial words. For every prefix P_1..t+1 the frozen generator
(``--generator``) completes a sentence x, and the action p_t+1 earns the reward

    Q = T_c'(x) - S_c'(x),   c' = argmax_c T_c(x)        (Eq. 7, adversarial: ``reward = "adversarial"``)
    Q = max_c T_c(x)                                     (Eq. 6, ``reward = "confidence"``, for ablation)

with T and S the teacher's and student's class probabilities. The prompter follows REINFORCE
(Eq. 4) on these rewards (optionally minus the batch mean per position, ``synth.baseline``),
plus the repeat penalty of Eq. 8: minus the KL divergences between its next-token distributions
at different positions, which pushes the positions apart and so against repeating a token.
Loss terms: ``reward`` (REINFORCE) and ``repeat`` (Eq. 8). Every completion joins the student's
training pool with the teacher's logits, so each round also feeds the student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_cli.batches import TextBatch
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.registry import register_synthesizer
from dfkd_cli.text.synth import GenerationConfig, TextSynthesizer, complete

INITIAL_WORDS = ["The", "It", "To", "There", "What", "This", "All", "If", "We"]


@dataclass
class RLPromptConfig(GenerationConfig):
    prompt_length: int = 6  # tokens the prompter writes after the initial word (the paper finds 5-6 best)
    initial_words: list[str] = field(default_factory=lambda: list(INITIAL_WORDS))
    lr: float = 1e-5  # the prompter's Adam learning rate
    reward: str = "adversarial"  # adversarial (Eq. 7) | confidence (Eq. 6, non-adversarial)
    baseline: bool = False  # subtract the batch-mean reward at each position (not in the paper; see the recipe)

    def __post_init__(self) -> None:
        if self.reward not in ("adversarial", "confidence"):
            raise DfkdError(f"'synth.reward' must be adversarial or confidence, got {self.reward!r}")
        if self.prompt_length < 1:
            raise DfkdError(f"'synth.prompt_length' must be at least 1, got {self.prompt_length}")
        words = self.initial_words
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise DfkdError("'synth.initial_words' must be a non-empty list of words, e.g. [\"The\", \"It\"]")


@dataclass
class Prompts:
    """A batch of sampled prompts: token ids (left-padded), their mask, and where the sampled part starts."""

    ids: torch.Tensor
    mask: torch.Tensor
    start: int

    def prefixes(self, tokenizer: Any) -> list[list[str]]:
        """prefixes[b][t]: prompt b up to and including its sampled token t."""
        rows = []
        for ids, mask in zip(self.ids, self.mask):
            kept = ids[mask.bool()].tolist()
            offset = len(kept) - (len(ids) - self.start)
            rows.append([tokenizer.decode(kept[: offset + t + 1], skip_special_tokens=True) for t in range(len(ids) - self.start)])
        return rows


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@register_synthesizer("promptdfd-rl")
class RLPromptSynthesizer(TextSynthesizer):
    """``promptdfd-rl``: the prompter learns, by REINFORCE, prompts whose completions the student
    gets wrong; the completions train the student."""

    Config = RLPromptConfig
    loss_terms = ("reward", "repeat")
    needs = ("generator", "prompter")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        model, tokenizer = self.language_model("prompter")
        # The prompter is trained: a copy of its own, so the loaded model (and any other run's) stays as given.
        self.prompter = (copy.deepcopy(model).requires_grad_(True), tokenizer)
        self.optimizer = torch.optim.Adam(self.prompter[0].parameters(), lr=self.config.lr)

    def sample_prompts(self, n: int) -> Prompts:
        """``n`` prompts: an initial word each, then ``prompt_length`` tokens sampled from the prompter."""
        model, tokenizer = self.prompter
        words = [self.config.initial_words[i] for i in torch.randint(len(self.config.initial_words), (n,)).tolist()]
        enc = tokenizer(words, return_tensors="pt", padding=True).to(self.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        start = ids.shape[1]
        with torch.inference_mode():
            for _ in range(self.config.prompt_length):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1]
                token = torch.multinomial(F.softmax(logits.float(), -1), 1)
                ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        return Prompts(ids.clone(), mask.clone(), start)

    def policy(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(p_t+1 | P_1..t) of the sampled tokens [n, k] and the next-token log-distributions [n, k, V]."""
        model, _ = self.prompter
        logits = model(input_ids=prompts.ids, attention_mask=prompts.mask, position_ids=_positions(prompts.mask)).logits
        log_dist = F.log_softmax(logits[:, prompts.start - 1 : -1].float(), -1)
        taken = log_dist.gather(-1, prompts.ids[:, prompts.start :, None]).squeeze(-1)
        return taken, log_dist

    def rewards(self, texts: list[str], teacher_logits: torch.Tensor) -> torch.Tensor:
        """Q for every text: Eq. 7 (adversarial) or Eq. 6 (confidence)."""
        p_teacher = F.softmax(teacher_logits.float(), -1)
        if self.config.reward == "confidence":
            return p_teacher.max(-1).values
        p_student = F.softmax(self.student_logits(texts).float(), -1)
        target = p_teacher.argmax(-1, keepdim=True)
        return (p_teacher.gather(-1, target) - p_student.gather(-1, target)).squeeze(-1)

    def synthesize(self) -> None:
        """One round: sample prompts, complete every prefix, reward, update the prompter, pool the texts."""
        n, k = self.config.batch_size, self.config.prompt_length
        prompts = self.sample_prompts(n)
        prefixes = [p for row in prompts.prefixes(self.prompter[1]) for p in row]
        texts = complete(self.language_model("generator"), prefixes, self.config, self.device)
        teacher_logits = self.label(texts)
        q = self.rewards(texts, teacher_logits).view(n, k).to(self.device)
        advantage = q - q.mean(0, keepdim=True) if self.config.baseline else q
        taken, log_dist = self.policy(prompts)
        reinforce = -(advantage.detach() * taken).sum(1).mean()
        repeat = -repeat_divergence(log_dist)
        loss = self.loss.get("reward", 1.0) * reinforce + self.loss.get("repeat", 0.0) * repeat
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.backward(loss)
        self.world.average_gradients(self.prompter[0].parameters())  # one prompter on every rank
        self.scaler.step(self.optimizer)
        self.pool.add(TextBatch(texts, teacher_logits))
        self.metrics = {"reward": float(q.mean()), "repeat": float(repeat.detach())}

    def make(self, n: int) -> list[str]:
        """``n`` texts from the current prompter: every prefix of ceil(n / k) prompts, completed."""
        count = -(-n // self.config.prompt_length)
        prefixes = [p for row in self.sample_prompts(count).prefixes(self.prompter[1]) for p in row]
        return complete(self.language_model("generator"), prefixes[:n], self.config, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prompter": self.prompter[0].state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prompter[0].load_state_dict(state["prompter"])
        self.optimizer.load_state_dict(state["optimizer"])


def repeat_divergence(log_dist: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of the summed KL(pi_i || pi_j) over position pairs i != j (Eq. 8 without its sign)."""
    k = log_dist.shape[1]
    if k < 2:
        return log_dist.new_zeros(())
    p = log_dist.exp()
    # KL(i || j) = sum_v p_i (log p_i - log p_j), for every pair at once: [n, k, k]
    cross = torch.einsum("niv,njv->nij", p, log_dist)
    self_term = (p * log_dist).sum(-1)
    kl = self_term[:, :, None] - cross
    return kl.sum((1, 2)).mean()


def repetition_rate(ids: torch.Tensor) -> float:
    """Fraction of sampled prompt tokens that repeat an earlier token of the same prompt."""
    repeats = total = 0
    for row in ids.tolist():
        repeats += len(row) - len(set(row))
        total += len(row)
    return repeats / max(total, 1)
